"""Divergence guard: injected NaNs and spikes are caught, logged, skipped or rolled back."""

import json

import pytest
import torch
from safetensors.torch import load_file

import zotune
from conftest import SHARED_DATA, needs_shared_data
from zotune.cli import parse_config
from zotune.train import loop
from zotune.train.guard import DivergenceGuard
from zotune.train.replay import replay


def quadratic():
    theta = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))
    return theta, lambda: (theta ** 2).sum()


def run(guard, steps, inject):
    """Train a quadratic; ``inject[step]`` replaces that step's loss ('nan' or a multiplier)."""
    theta, loss = quadratic()
    opt = zotune.mezo([theta], lr=0.01, eps=1e-3, seed=1, nan_policy="skip")
    history, events = [], []
    for step in range(steps):
        def closure(step=step):
            value = loss()
            if inject.get(step) == "nan":
                return torch.tensor(float("nan"))
            return value * inject.get(step, 1.0)

        lrs = [g["lr"] for g in opt.param_groups]
        opt.step(closure, accept=guard.accept)
        event = guard.after_step(opt, opt.last_record, lrs)
        if event:
            events.append(event)
        history.append(theta.detach().clone())
    return history, events, opt


def test_nan_and_spike_are_skipped_and_logged():
    guard = DivergenceGuard(spike_factor=3.0, window=20, min_history=5)
    history, events, opt = run(guard, 30, {8: "nan", 20: 50.0})
    assert [(e.step, e.kind) for e in events] == [(8, "non_finite"), (20, "spike")]
    # Skipped steps only perturb and restore: equal up to float64 rounding (a few ulps).
    torch.testing.assert_close(history[8], history[7], rtol=0, atol=1e-14)
    torch.testing.assert_close(history[20], history[19], rtol=0, atol=1e-14)
    assert opt.num_skipped == 2
    assert events[1].median is not None and events[1].loss > 3 * events[1].median


def test_rollback_undoes_previous_updates_and_lowers_lr():
    guard = DivergenceGuard(spike_factor=3.0, window=20, action="rollback", rollback_steps=2, lr_factor=0.5,
                            min_history=5)
    history, events, opt = run(guard, 25, {20: 50.0})
    assert events[0].rolled_back == 2
    # Rejected step 20, and steps 18 and 19 undone: back to the weights after step 17.
    torch.testing.assert_close(history[20], history[17], rtol=0, atol=1e-12)
    assert opt.param_groups[0]["lr"] == 0.005


def test_guard_validation_and_stateful_rollback():
    with pytest.raises(ValueError):
        DivergenceGuard(spike_factor=2.0, action="reset")
    theta, loss = quadratic()
    opt = zotune.mezo_adam([theta], lr=0.01)
    opt.step(loss)
    with pytest.raises(ValueError, match="linear update rule"):
        opt.rollback([(opt.last_record, [0.01])])


@needs_shared_data
def test_training_loop_logs_events_and_replay_follows_them(tiny_model_dir, tmp_path, monkeypatch):
    original = loop.LOSSES["classification"]
    calls = {"n": 0}

    def injected(model, batch, pad_id, copies=None):  # two calls per step (two-sided SPSA)
        step = calls["n"] // 2
        calls["n"] += 1
        value = original(model, batch, pad_id, copies)
        if step == 9:
            return value * float("nan")
        return value * 40.0 if step == 16 else value

    monkeypatch.setitem(loop.LOSSES, "classification", injected)
    cfg = parse_config([
        "--model.name", str(tiny_model_dir), "--data.data_dir", str(SHARED_DATA), "--data.n_train", "64",
        "--data.n_dev", "0", "--data.n_test", "8", "--train.steps", "22", "--train.batch_size", "4",
        "--optim.trainable", "all", "--optim.lr", "1e-3", "--train.zero_shot", "false", "--train.progress", "false",
        "--train.output_dir", str(tmp_path), "--train.run_name", "guarded", "--train.guard_spike", "5",
        "--train.guard_action", "rollback", "--train.guard_rollback_steps", "2", "--train.guard_lr_factor", "0.5",
    ])
    loop.fit(cfg, say=lambda _: None)
    run_dir = tmp_path / "guarded"
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if "event" in line]
    assert [(e["step"], e["event"], e["rolled_back"]) for e in events] == [(10, "non_finite", 2), (17, "spike", 2)]
    monkeypatch.setitem(loop.LOSSES, "classification", original)
    output = replay(str(tiny_model_dir), run_dir, tmp_path / "replayed.safetensors", progress=False, say=lambda _: None)
    replayed, trained = load_file(str(output)), load_file(str(run_dir / "trainable.safetensors"))
    assert all(torch.equal(replayed[k], trained[k]) for k in trained)
