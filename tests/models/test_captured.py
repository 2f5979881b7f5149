"""CapturedCausalLM: the bucketed, 4-D-masked forward it captures computes the model's logits (checked
eagerly on the CPU); the capture itself runs where CUDA exists."""

import math

import pytest
import torch

from conftest import tiny_llama, tiny_opt
from zotune.eval.scoring import tail_logprobs
from zotune.models.captured import CapturedCausalLM, capture_unsupported, padded_length


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=g))
        out.append((tuple(torch.randint(1, 64, (length,), generator=g).tolist()), 1))
    return out


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_bucketed_masked_forward_scores_like_the_model(implementation, build):
    model = build()
    model.config._attn_implementation = implementation
    batch = rows(6, 0)  # lengths 3..19, left-padded to the longest, then to a multiple of 8 (the bucket)
    plain = tail_logprobs(model, batch, pad_id=0)
    bucketed = tail_logprobs(CapturedCausalLM(model, capture=False), batch, pad_id=0)
    assert bucketed.shape == plain.shape
    # Extra left padding and an explicit mask change nothing but float rounding of the masked sums.
    assert torch.allclose(bucketed, plain, atol=1e-5), (bucketed - plain).abs().max()


def test_padded_lengths_are_few_and_waste_at_most_a_quarter():
    for bucket in (1, 8, 32):
        padded = [padded_length(n, bucket) for n in range(1, 4097)]
        assert all(p >= n and p % bucket == 0 for n, p in zip(range(1, 4097), padded))
        assert padded == sorted(padded)  # a longer batch never gets a shorter shape
        # Up to 4·bucket tokens the bucket's multiples; beyond, padding adds less than a quarter.
        assert all(p - n < bucket for n, p in zip(range(1, 4 * bucket + 1), padded))
        assert all((p - n) * 4 < n for n, p in zip(range(4 * bucket + 1, 4097), padded))
        # Four shapes up to 4·bucket, then four per doubling of the length: few graphs up to 4096 tokens.
        assert len(set(padded)) <= 4 + 4 * math.log2(4096 / (4 * bucket))
    assert [padded_length(n, 8) for n in (5, 8, 9, 33, 65, 129)] == [8, 8, 16, 40, 80, 160]


def test_the_compiled_forward_scores_like_the_model():
    # Through torch.compile's graph capture (dynamo) with its eager backend: the same operations, so the
    # same numbers; inductor's fused kernels run in the CUDA tests.
    model = tiny_llama()
    batch = rows(6, 3)
    plain = tail_logprobs(CapturedCausalLM(model, capture=False), batch, pad_id=0)
    compiled = CapturedCausalLM(model, capture=False, compile="eager")
    torch.testing.assert_close(tail_logprobs(compiled, batch, pad_id=0), plain, rtol=0, atol=0)
    assert compiled.backend == "eager"


def test_a_failed_compilation_warns_once_and_runs_uncompiled():
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no kernels for this graph")

    model = tiny_llama()
    batch = rows(4, 4)
    compiled = CapturedCausalLM(model, capture=False, compile=failing_backend)
    with pytest.warns(RuntimeWarning, match="torch.compile of LlamaForCausalLM's forward failed.*no kernels"):
        first = tail_logprobs(compiled, batch, pad_id=0)
    assert compiled.backend is None
    torch.testing.assert_close(first, tail_logprobs(CapturedCausalLM(model, capture=False), batch, pad_id=0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: later calls run the model itself
        tail_logprobs(compiled, batch, pad_id=0)


def test_a_failed_capture_warns_once_and_runs_eagerly():
    # On a machine without CUDA the capture itself fails (no CUDA stream): the fallback path for real.
    if torch.cuda.is_available():
        pytest.skip("capture succeeds here; the failure path is exercised where CUDA is absent")
    model = tiny_llama()
    captured = CapturedCausalLM(model)
    batch = rows(4, 2)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of LlamaForCausalLM's forward failed"):
        first = tail_logprobs(captured, batch, pad_id=0)
    assert captured.failure is not None
    torch.testing.assert_close(first, tail_logprobs(model, batch, pad_id=0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: later calls go straight to the model
        torch.testing.assert_close(tail_logprobs(captured, batch, pad_id=0), first)


def test_a_cpu_model_is_not_captured():
    assert capture_unsupported(tiny_llama()) == "the model is not (entirely) on a CUDA device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [None, "inductor"])
def test_replays_follow_in_place_weight_changes_on_cuda(compile):
    model = tiny_llama().cuda()
    assert capture_unsupported(model) is None
    captured = CapturedCausalLM(model, compile=compile)
    batch = rows(4, 1)
    first = tail_logprobs(captured, batch, pad_id=0)
    assert captured.failure is None and len(captured._graphs) == 1 and captured.backend == compile
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # what the in-place path does between the two evaluations of a query
    replayed = tail_logprobs(captured, batch, pad_id=0)
    assert len(captured._graphs) == 1  # the same graph, not a new capture
    assert torch.allclose(replayed, tail_logprobs(model, batch, pad_id=0), atol=1e-4)
    assert not torch.allclose(replayed, first)
