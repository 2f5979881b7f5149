"""`torchrun -m zotune train` on 2 CPU processes: rank 0 writes the run; a dead rank fails the job; resume."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED_DATA, needs_fsdp, needs_shared_data
from test_parallel import torchrun_command

DIE_AT_STEP = Path(__file__).with_name("die_at_step.py")

pytestmark = needs_shared_data


def torchrun_train(model_dir, out, name, extra=(), die_at=None):
    """The torchrun command of a 20-step run; ``die_at=(rank, step)`` makes that rank SIGKILL itself after that step."""
    program = ["-m", "zotune"] if die_at is None else [str(DIE_AT_STEP), *map(str, die_at)]
    return torchrun_command(
        *program, "train", "--model.name", str(model_dir),
        "--data.data_dir", str(SHARED_DATA), "--data.n_train", "64", "--data.n_dev", "0", "--data.n_test", "8",
        "--train.steps", "20", "--train.batch_size", "4", "--optim.lr", "1e-3", "--optim.trainable", "all",
        "--train.zero_shot", "false", "--train.progress", "false", "--train.output_dir", str(out),
        "--train.run_name", name, "--train.checkpoint_every", "5", "--train.dist_timeout", "60", *extra)


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def saved_weights(model_dir):
    """The saved model's weights, by parameter name."""
    return load_file(str(model_dir / "model.safetensors")).items()


def test_two_ranks_train_kill_one_and_resume(tiny_model_dir, tmp_path):
    done = subprocess.run(torchrun_train(tiny_model_dir, tmp_path, "straight"), capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    straight = tmp_path / "straight"
    assert (straight / "results.json").exists() and (straight / "trajectory.bin").exists()
    assert done.stdout.count("fine-tuned accuracy") == 1  # rank 0 alone reports

    start = time.time()  # rank 1 dies after step 12: rank 0 waits at the next collective, then fails
    killed = subprocess.run(torchrun_train(tiny_model_dir, tmp_path, "killed", die_at=(1, 12)), capture_output=True,
                            text=True, timeout=300, env=ENV)
    assert killed.returncode != 0
    assert time.time() - start < 120  # the job stops instead of hanging (dist_timeout is 60 s)
    assert not (tmp_path / "killed" / "results.json").exists()
    assert (tmp_path / "killed" / "checkpoints" / "step-000000010").is_dir()  # resume has a checkpoint to go from

    done = subprocess.run(torchrun_train(tiny_model_dir, tmp_path, "killed", ("--train.resume", "true")),
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed" in done.stdout
    resumed, reference = load_file(str(tmp_path / "killed" / "trainable.safetensors")), load_file(
        str(straight / "trainable.safetensors"))
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


# mezo_adam: moments sharded like the parameters (its directions and trajectory are plain MeZO's, whose
# sharded steps tests/distributed/test_fsdp.py checks in one process); adazeta: TT adapters sharded, q
# growing 1 -> 3
ADAZETA = ("--adapter.kind", "adp", "--adapter.bottleneck", "8", "--adapter.tt_rank", "2", "--optim.trainable", "auto",
           "--optim.q_alpha", "2", "--optim.q_max", "3", "--optim.q_beta", "1")


@needs_fsdp
@pytest.mark.parametrize("method", ["mezo_adam", "adazeta"])
def test_sharded_fsdp_run_replays_bit_identically_in_one_process(tiny_model_dir, tmp_path, method):
    from zotune.train.replay import replay

    # every checkpoint kept, so that the run folder can be cut back to step 10 below (the resumes, 4 ranks on
    # this machine's 2 cores the slowest, then run 10 steps)
    extra = ("--train.sharding", "fsdp", "--data.n_dev", "8", "--train.eval_every", "10",
             "--train.keep_checkpoints", "4", "--optim.method", method, *(ADAZETA if method == "adazeta" else ()))
    done = subprocess.run(torchrun_train(tiny_model_dir, tmp_path, "sharded", extra), capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "sharded"
    assert (run / "results.json").exists() and done.stdout.count("fine-tuned accuracy") == 1
    checkpoint = run / "checkpoints" / "step-000000020"
    assert (checkpoint / "manifest.json").exists() and not (checkpoint / "trainable.safetensors").exists()
    # The ranks perturbed and updated their shards with directions drawn by each element's position in its
    # whole parameter: replaying the log in one process, unsharded, rebuilds the gathered final weights exactly.
    said = []
    replay(str(tiny_model_dir), run, tmp_path / "replayed.safetensors", progress=False, say=said.append)
    assert any("bit-identical to the run's final weights" in line for line in said), said
    reference = load_file(str(run / "trainable.safetensors"))

    # The run folder as a job killed after step 20 with step 10 its newest checkpoint would leave it (a rank
    # dying mid-run: test_two_ranks_train_kill_one_and_resume), copied for each resume: the resume rebuilds
    # the shards from the trajectory (step 10), drops the records after it and trains steps 11-20 again.
    for later in ("step-000000015", "step-000000020"):
        shutil.rmtree(run / "checkpoints" / later)
    for written_at_the_end in ("results.json", "trainable.safetensors"):
        (run / written_at_the_end).unlink()
    # mezo_adam: also resumed by 4 ranks, the moments gathered, then split in 4
    for name, ranks in [("by-two", 2), *([("by-four", 4)] if method == "mezo_adam" else [])]:
        shutil.copytree(run, tmp_path / name)
        command = torchrun_train(tiny_model_dir, tmp_path, name, (*extra, "--train.resume", "true"))
        command[command.index("--nproc_per_node") + 1] = str(ranks)
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "rebuilt the weights of step 10 from the trajectory log" in done.stdout
    resumed = load_file(str(tmp_path / "by-two" / "trainable.safetensors"))
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    if method == "mezo_adam":
        # 4 ranks split each batch of 4 in ones, not twos: the step's loss is the same mean rounded another
        # way (~1e-7 relative), so the last 10 steps differ at rounding level, far below how far the
        # weights moved (above 1e-3 here): within 1e-4, not bit for bit.
        initial = dict(saved_weights(tiny_model_dir))
        assert max((reference[n] - initial[n]).abs().max() for n in reference) > 1e-3  # the weights moved
        by_four = load_file(str(tmp_path / "by-four" / "trainable.safetensors"))
        for name in reference:
            torch.testing.assert_close(by_four[name], reference[name], rtol=0, atol=1e-4, msg=name)
