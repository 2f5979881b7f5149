"""CapturedCausalLM: the bucketed, 4-D-masked forward it captures computes the model's logits (checked
eagerly on the CPU); the capture itself runs where CUDA exists."""

import pytest
import torch

from conftest import tiny_llama, tiny_opt
from zotune.eval.scoring import tail_logprobs
from zotune.models.captured import CapturedCausalLM, capture_unsupported


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
    batch = rows(6, 0)  # lengths 3..19, left-padded to the longest, then to the 32-token bucket
    plain = tail_logprobs(model, batch, pad_id=0)
    bucketed = tail_logprobs(CapturedCausalLM(model, bucket=32, capture=False), batch, pad_id=0)
    assert bucketed.shape == plain.shape
    # Extra left padding and an explicit mask change nothing but float rounding of the masked sums.
    assert torch.allclose(bucketed, plain, atol=1e-5), (bucketed - plain).abs().max()


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
def test_replays_follow_in_place_weight_changes_on_cuda():
    model = tiny_llama().cuda()
    assert capture_unsupported(model) is None
    captured = CapturedCausalLM(model)
    batch = rows(4, 1)
    first = tail_logprobs(captured, batch, pad_id=0)
    assert captured.failure is None and len(captured._graphs) == 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # what the in-place path does between the two evaluations of a query
    replayed = tail_logprobs(captured, batch, pad_id=0)
    assert len(captured._graphs) == 1  # the same graph, not a new capture
    assert torch.allclose(replayed, tail_logprobs(model, batch, pad_id=0), atol=1e-4)
    assert not torch.allclose(replayed, first)
