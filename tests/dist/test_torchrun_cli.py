"""`torchrun -m zotune train` on 2 CPU processes: rank 0 writes the run; a dead rank fails the job; resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED_DATA, needs_shared_data
from test_parallel import free_port

pytestmark = needs_shared_data


def torchrun_train(model_dir, out, name, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "zotune", "train", "--model.name", str(model_dir),
            "--data.data_dir", str(SHARED_DATA), "--data.n_train", "64", "--data.n_dev", "0", "--data.n_test", "8",
            "--train.steps", "30", "--train.batch_size", "4", "--optim.lr", "1e-3", "--optim.trainable", "all",
            "--train.zero_shot", "false", "--train.progress", "false", "--train.output_dir", str(out),
            "--train.run_name", name, "--train.checkpoint_every", "5", "--train.dist_timeout", "60", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def workers_of(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the worker processes that torchrun's agent started."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        rank = [v for v in environ if v.startswith(b"RANK=")]
        if parent == agent_pid and rank:
            ranks[int(rank[0][5:])] = int(entry.name)
    return ranks


def test_two_ranks_train_kill_one_and_resume(tiny_model_dir, tmp_path):
    done = subprocess.run(torchrun_train(tiny_model_dir, tmp_path, "straight"), capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    straight = tmp_path / "straight"
    assert (straight / "results.json").exists() and (straight / "trajectory.bin").exists()
    assert done.stdout.count("fine-tuned accuracy") == 1  # rank 0 alone reports

    agent = subprocess.Popen(torchrun_train(tiny_model_dir, tmp_path, "killed"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or log.read_text().count('"loss"') < 12):
        time.sleep(0.2)
    os.kill(workers_of(agent.pid)[1], signal.SIGKILL)  # rank 1 dies mid-run
    start = time.time()
    _, stderr = agent.communicate(timeout=300)
    assert agent.returncode != 0
    assert time.time() - start < 120  # the job stops instead of hanging
    assert not (tmp_path / "killed" / "results.json").exists()

    done = subprocess.run(torchrun_train(tiny_model_dir, tmp_path, "killed", ("--train.resume", "true")),
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" in done.stdout
    resumed, reference = load_file(str(tmp_path / "killed" / "trainable.safetensors")), load_file(
        str(straight / "trainable.safetensors"))
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
