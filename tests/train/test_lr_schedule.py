"""Learning-rate schedules: their values, and a scheduled run that stops, resumes and replays exactly."""

import json
import math
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from conftest import needs_shared_data
from test_checkpoint_and_replay import assert_same, logged_steps, train_args, train_here
from zotune.config import ConfigError, RunConfig, apply_overrides
from zotune.train.replay import replay
from zotune.train.schedule import lr_multiplier
from zotune.train.validate import validate


def test_schedule_values():
    assert [lr_multiplier("constant", s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lr_multiplier("linear", s, 10) for s in range(10)] == pytest.approx([1 - s / 10 for s in range(10)])
    assert lr_multiplier("cosine", 0, 10) == 1.0 and lr_multiplier("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_multiplier("cosine", 9, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    # warm-up: 1/w .. 1 over w steps, then the schedule over the steps left (the first of them at 1)
    assert [lr_multiplier("linear", s, 14, warmup_steps=4) for s in range(6)] == \
        pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.9])
    assert lr_multiplier("linear", 20, 10) == 0.0  # past the end (more steps on resume): no negative lr
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_multiplier("step", 0, 10)


def test_bad_schedule_settings_fail_before_loading():
    with pytest.raises(ConfigError, match="train.lr_schedule must be one of constant, linear, cosine"):
        validate(apply_overrides(RunConfig(), {"train.lr_schedule": "linaer"}))
    with pytest.raises(ConfigError, match="train.warmup_steps must be >= 0"):
        validate(apply_overrides(RunConfig(), {"train.warmup_steps": -1}))


@needs_shared_data
def test_a_scheduled_run_stops_resumes_and_replays_bit_identically(tiny_model_dir, tmp_path):
    schedule = ("--train.lr_schedule", "linear", "--train.warmup_steps", "5")
    assert train_here(tiny_model_dir, tmp_path, "straight", steps=30, extra=schedule) == 0
    straight = tmp_path / "straight"
    lrs = [json.loads(line)["lr"] for line in (straight / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert lrs == pytest.approx([1e-3 * lr_multiplier("linear", s, 30, 5) for s in range(30)])

    args = train_args(tiny_model_dir, tmp_path, "stopped", steps=30, extra=schedule)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while logged_steps(tmp_path / "stopped") < 12 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert train_here(tiny_model_dir, tmp_path, "stopped", steps=30, extra=(*schedule, "--train.resume", "true")) == 0
    assert_same(load_file(str(tmp_path / "stopped" / "trainable.safetensors")),
                load_file(str(straight / "trainable.safetensors")))

    # the trajectory log holds each step's lr: replay needs no knowledge of the schedule
    output = replay(str(tiny_model_dir), straight, tmp_path / "replayed.safetensors", progress=False,
                    say=lambda _: None)
    assert_same(load_file(str(output)), load_file(str(straight / "trainable.safetensors")))
