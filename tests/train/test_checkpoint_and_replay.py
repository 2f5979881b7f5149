"""Nothing lost: crash-safe checkpoints, bit-identical resume after SIGKILL, and replay."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED_DATA, needs_shared_data, tiny_llama
from zotune.train import trajectory
from zotune.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint, verify
from zotune.train.replay import replay

pytestmark = needs_shared_data


def cli_args(model_dir, out, name, method="mezo", steps=60, extra=()):
    return ["train", "--model.name", str(model_dir), "--data.data_dir", str(SHARED_DATA), "--data.n_train", "64",
            "--data.n_dev", "0", "--data.n_test", "8", "--train.steps", str(steps), "--train.batch_size", "4",
            "--optim.method", method, "--optim.lr", "1e-3", "--optim.trainable", "all", "--train.zero_shot", "false",
            "--train.progress", "false", "--train.output_dir", str(out), "--train.run_name", name,
            "--train.checkpoint_every", "5", *extra]


def train_args(model_dir, out, name, method="mezo", steps=60, extra=()):
    """The command of a run in its own process (one a test can kill), one thread."""
    return [sys.executable, "-m", "zotune", *cli_args(model_dir, out, name, method, steps, ("--train.threads", "1",
                                                                                            *extra))]


def train_here(model_dir, out, name, method="mezo", steps=60, extra=()) -> int:
    """The same run in this process (a process of its own spends seconds importing transformers), on one
    thread like the processes whose weights it is compared with; the test process's threads are restored."""
    from zotune.cli import main

    threads = torch.get_num_threads()
    try:
        return main(cli_args(model_dir, out, name, method, steps, ("--train.threads", "1", *extra)))
    finally:
        torch.set_num_threads(threads)


def logged_steps(run_dir):
    path = run_dir / "log.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


def weights(run_dir):
    return load_file(str(run_dir / "trainable.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert train_here(tiny_model_dir, out, "straight") == 0
    return out / "straight"


def test_sigkill_then_resume_is_bit_identical(tiny_model_dir, tmp_path, straight_run):
    kill_after = random.Random(2024).randint(7, 40)  # a fixed "random" step, not a multiple of 5
    proc = subprocess.Popen(train_args(tiny_model_dir, tmp_path, "killed"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "killed"
    deadline = time.time() + 120
    while logged_steps(run_dir) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = logged_steps(run_dir)
    assert kill_after <= killed_at < 60 and not (run_dir / "results.json").exists()
    assert train_here(tiny_model_dir, tmp_path, "killed", extra=("--train.resume", "true")) == 0
    assert_same(weights(run_dir), weights(straight_run))
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 61))  # lines after the checkpoint dropped
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] < kill_after and resumed[0]["changed"] == {}


def test_sigterm_checkpoints_and_exits(tiny_model_dir, tmp_path, straight_run):
    proc = subprocess.Popen(train_args(tiny_model_dir, tmp_path, "stopped"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "stopped"
    while logged_steps(run_dir) < 12 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--train.resume true" in err
    manifest = verify(latest_checkpoint(run_dir))
    stopped_at = manifest["step"]
    assert manifest["extra"]["config"]["optim"]["method"] == "mezo"
    assert manifest["extra"]["data"]["next_step"] == stopped_at
    assert stopped_at == logged_steps(run_dir)  # checkpoint at the step it stopped after, nothing lost
    assert train_here(tiny_model_dir, tmp_path, "stopped", extra=("--train.resume", "true")) == 0
    assert_same(weights(run_dir), weights(straight_run))


def test_a_trajectory_checkpoint_holds_no_weights_and_resumes_bit_identically(tiny_model_dir, tmp_path,
                                                                              straight_run, capsys):
    logged = ("--train.checkpoint", "trajectory")
    args = train_args(tiny_model_dir, tmp_path, "logged", extra=logged)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "logged"
    while logged_steps(run_dir) < 23 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    checkpoint = latest_checkpoint(run_dir)
    manifest = verify(checkpoint)
    assert manifest["weights"] == "trajectory" and not (checkpoint / "trainable.safetensors").exists()
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_checkpoint(checkpoint, tiny_llama(), None)
    assert train_here(tiny_model_dir, tmp_path, "logged", extra=(*logged, "--train.resume", "true")) == 0
    assert f"rebuilt the weights of step {manifest['step']} from the trajectory log" in capsys.readouterr().out
    assert_same(weights(run_dir), weights(straight_run))


def test_big_sgd_type_runs_checkpoint_their_trajectory_by_default():
    from zotune.optim import get_method
    from zotune.train.setup import checkpoint_kind

    assert checkpoint_kind(None, get_method("mezo"), 13 * 10**9) == "trajectory"
    assert checkpoint_kind(None, get_method("lozo"), 7 * 10**9) == "trajectory"
    assert checkpoint_kind(None, get_method("mezo"), 135 * 10**6) == "weights"  # small: weights are cheap
    assert checkpoint_kind(None, get_method("mezo_adam"), 13 * 10**9) == "weights"  # moments: not SGD-type
    assert checkpoint_kind(None, get_method("adamw"), 13 * 10**9) == "weights"
    assert checkpoint_kind("trajectory", get_method("mezo"), 10) == "trajectory"


ADAZETA = ("--adapter.kind", "adp", "--adapter.bottleneck", "8", "--adapter.tt_rank", "2", "--optim.trainable",
           "auto", "--optim.q_alpha", "2", "--optim.q_max", "3", "--optim.q_beta", "1")


LORA = ("--adapter.kind", "lora", "--adapter.r", "4", "--optim.trainable", "auto")


@pytest.mark.parametrize("method", ["mezo", "lozo_m", "tezo_adam", "mezo_adam", "adazeta", "mezo+lora"])
def test_replay_rebuilds_the_weights_bit_identically(tiny_model_dir, tmp_path, method):
    # AdaZeta: adapters, and q = 1 in epoch 0, 2 in epoch 1; MeZO-LoRA: A seeded by adapter.seed
    extra = {"adazeta": ADAZETA, "mezo+lora": LORA}.get(method, ())
    method, _, _ = method.partition("+")
    assert train_here(tiny_model_dir, tmp_path, "run", method=method, steps=25, extra=extra) == 0
    run_dir = tmp_path / "run"
    said = []
    output = replay(str(tiny_model_dir), run_dir, tmp_path / "replayed.safetensors", progress=False, say=said.append)
    assert_same(load_file(str(output)), weights(run_dir))
    assert said[0].endswith("25 of 25 steps recorded; the run is finished")
    assert said[-1] == "bit-identical to the run's final weights"
    if method == "adazeta":
        queries = [json.loads(line).get("queries") for line in (run_dir / "log.jsonl").read_text().splitlines()]
        assert [q for q in queries if q] == [1] * 16 + [2] * 9


def test_trajectory_size_for_20000_steps():
    # One two-sided query and one param group: 8 (step) + 2 (guard flags) + 2 (count) + 2 x 8 (losses) + 8 (lr).
    assert trajectory.record_format(2, 1).size == 36
    assert trajectory.record_format(2, 1).size * 20_000 < 2 * 2**20


def test_checkpoint_files_are_verified(tmp_path):
    import zotune

    model = tiny_llama()
    opt = zotune.mezo_adam(model.parameters(), lr=1e-3)
    opt.step(lambda: model(input_ids=torch.ones(1, 4, dtype=torch.long)).logits.mean())
    path = save_checkpoint(tmp_path, 1, model, opt, {"note": "x"})
    assert verify(path)["extra"] == {"note": "x"} and latest_checkpoint(tmp_path) == path

    fresh = tiny_llama(seed=5)
    fresh_opt = zotune.mezo_adam(fresh.parameters(), lr=1e-3)
    load_checkpoint(path, fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    assert fresh_opt.num_steps == 1

    data = (path / "optimizer.pt").read_bytes()
    (path / "optimizer.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path, fresh, fresh_opt)
    (path / "manifest.json").unlink()  # an unfinished checkpoint is not picked up
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="not finished"):
        verify(path)


def test_resume_errors(tmp_path, capsys):
    from zotune.cli import main

    assert main(["train", "--train.resume", "true"]) == 2
    assert "train.resume needs train.run_name" in capsys.readouterr().err
    assert main(["train", "--train.resume", "true", "--train.run_name", "nope", "--train.output_dir",
                 str(tmp_path), "--model.name", "./not/loaded"]) == 2
    assert "nothing to resume" in capsys.readouterr().err  # reported before the (missing) model is loaded
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "log.jsonl").write_text("")
    assert main(["train", "--train.run_name", "half", "--train.output_dir", str(tmp_path)]) == 2
    assert "unfinished run" in capsys.readouterr().err


def test_replay_says_what_the_log_holds(tiny_model_dir, tmp_path, straight_run):
    import shutil

    empty = tmp_path / "crashed"  # a run that stopped before its first step ended
    empty.mkdir()
    shutil.copy(straight_run / trajectory.HEADER, empty / trajectory.HEADER)
    with pytest.raises(ValueError, match="records no step: nothing to replay"):
        replay(str(tiny_model_dir), empty, progress=False, say=lambda _: None)
    partial = tmp_path / "partial"  # 52 of 60 steps, no results.json
    partial.mkdir()
    shutil.copy(straight_run / trajectory.HEADER, partial / trajectory.HEADER)
    header = json.loads((straight_run / trajectory.HEADER).read_text())
    size = trajectory.record_format(header["num_losses"], header["num_groups"]).size
    (partial / trajectory.RECORDS).write_bytes((straight_run / trajectory.RECORDS).read_bytes()[: 52 * size])
    said = []
    replay(str(tiny_model_dir), partial, tmp_path / "partial.safetensors", progress=False, say=said.append)
    assert "52 of 60 steps recorded; the run is unfinished" in said[0]
    assert not any("bit-identical" in line for line in said)  # no final weights to compare with


def test_replay_refuses_a_log_drawn_on_another_kind_of_device(tiny_model_dir, tmp_path, straight_run):
    import shutil

    assert json.loads((straight_run / trajectory.HEADER).read_text())["devices"] == ["cpu"]
    moved = tmp_path / "gpu-run"
    shutil.copytree(straight_run, moved)
    header = json.loads((moved / trajectory.HEADER).read_text())
    (moved / trajectory.HEADER).write_text(json.dumps({**header, "devices": ["cuda"]}))  # as a GPU run records it
    with pytest.raises(ValueError, match="recorded with the trainable weights on cuda and they are on cpu here"):
        replay(str(tiny_model_dir), moved, progress=False, say=lambda _: None)


def test_a_cuda_log_of_another_philox_stream_is_refused():
    from zotune.optim import philox

    here = ["cuda"]
    trajectory.check_devices({"devices": here, "stream": philox.STREAM}, here)  # this version's: replayed
    trajectory.check_devices({"devices": ["cpu"]}, ["cpu"])  # CPU logs draw from torch's generator: no stream
    for older in ({"devices": here}, {"devices": here, "stream": "philox4x32-10/box-muller/block-1024"}):
        with pytest.raises(ValueError, match="drawn on CUDA from the Philox stream 'philox4x32-10/box-muller/"
                                             "block-1024'"):
            trajectory.check_devices(older, here)


def test_a_resume_refuses_a_changed_setting_and_records_an_allowed_one(tiny_model_dir, tmp_path, capsys):
    import shutil

    assert train_here(tiny_model_dir, tmp_path, "run", steps=10) == 0
    (tmp_path / "run" / "results.json").unlink()  # as if it had stopped after its last checkpoint (step 10)
    capsys.readouterr()
    assert train_here(tiny_model_dir, tmp_path, "run", steps=10, extra=("--train.resume", "true", "--optim.lr", "0.1")
                      ) == 2
    assert "was started with optim.lr=0.001; this resume gives optim.lr=0.1" in capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere"  # the run folder moved and renamed, then resumed for longer
    shutil.copytree(tmp_path / "run", elsewhere / "moved")
    assert train_here(tiny_model_dir, elsewhere, "moved", steps=15, extra=("--train.resume", "true")) == 0
    assert "train.steps 10 -> 15 from here on" in capsys.readouterr().out
    run_dir = elsewhere / "moved"
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    changed = {"train.steps": [10, 15], "train.output_dir": [str(tmp_path), str(elsewhere)],
               "train.run_name": ["run", "moved"]}
    assert {"step": 10, "event": "resumed", "changed": changed} in records
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 16))
    import yaml

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 15
