"""AdaZeta's query schedule Q_e = min(max(floor(α e^β), 1), Q_max), alone and driving an optimizer."""

import math

import pytest
import torch

import zotune
from conftest import lm_closure, tiny_llama
from zotune.optim import QuerySchedule


def test_reference_llama_example():
    """α = 0.85, target 20, Q_max = 15, E_total = 160 (1000 examples, batch 16, 10,000 steps)."""
    schedule = QuerySchedule(alpha=0.85, q_max=15, target=20)
    assert schedule.exponent(160) == pytest.approx(math.log(20 / 0.85) / math.log(160))
    assert schedule.exponent(160) == pytest.approx(0.622, abs=1e-3)
    counts = [schedule.queries(e, 160) for e in range(160)]
    assert counts[:4] == [1, 1, 1, 1]  # q = 1 until about epoch 3
    assert counts.index(15) == 101  # the cap is reached at epoch 101 and kept
    assert all(c == 15 for c in counts[101:])
    assert all(a <= b for a, b in zip(counts, counts[1:]))  # never decreases


def test_explicit_beta_and_bounds():
    schedule = QuerySchedule(alpha=2.0, q_max=5, beta=0.5)
    assert [schedule.queries(e) for e in (0, 1, 4, 5, 6, 100)] == [1, 2, 4, 4, 4, 5]
    with pytest.raises(ValueError, match="epochs"):
        QuerySchedule().queries(3)  # β must be derived but the run length is unknown
    with pytest.raises(ValueError, match="q_max"):
        QuerySchedule(q_max=0)
    with pytest.raises(ValueError, match="alpha"):
        QuerySchedule(alpha=0)


def test_any_method_takes_a_schedule(batch):
    model = tiny_llama()
    opt = zotune.tezo(model.parameters(), lr=1e-3, rank=2, query_schedule=QuerySchedule(1.0, 3, beta=1.0))
    for epoch, expected in [(0, 1), (2, 2), (7, 3)]:
        assert opt.start_epoch(epoch) == expected
        opt.step(lm_closure(model, batch))
        assert len(opt.last_record.projected_grads) == expected


def test_adazeta_uses_the_schedule_and_trains_adapters(batch):
    from zotune.adapters import LorettaAdpConfig, inject

    model = inject(tiny_llama(), LorettaAdpConfig(bottleneck=8, tt_rank=2, train_norms=False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in model.parameters() if not p.requires_grad]
    opt = zotune.adazeta(trainable, lr=1e-3, q_alpha=1.0, q_max=4, q_target=4)
    assert opt.start_epoch(9, total_epochs=10) == 3  # β = ln 4 / ln 10: floor(9^0.602) = 3
    opt.step(lm_closure(model, batch))
    assert len(opt.last_record.projected_grads) == 3
    frozen_after = [p for p in model.parameters() if not p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(before, frozen_after))  # only the adapters moved
