"""Sharded ZO over FSDP2 (2 CPU processes, gloo) equals one unsharded process bit for bit in float32."""

import os
import subprocess

import pytest
import torch

import fsdp_worker
from test_parallel import torchrun_command


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """Every method's sharded run, by one torchrun job (its start-up paid once)."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun_command(fsdp_worker.__file__, str(out), ",".join(fsdp_worker.METHODS)),
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("method", fsdp_worker.METHODS)
def test_fsdp2_sharded_training_equals_one_unsharded_process(sharded_runs, method):
    sharded = torch.load(sharded_runs / f"fsdp-{method}.pt")
    assert sharded["local_numel"] < sharded["numel"]  # rank 0 held (and perturbed) only part of each parameter
    weights, grads = fsdp_worker.run_reference(method)
    # Each element's direction comes from its position in the whole parameter (Philox, addressed by
    # element; the factored methods' factors are drawn for the whole matrix and each rank applies its
    # rows), the forward gathers the same values, and the losses are averaged in float64 in the same
    # order: the projected gradients and every weight are bit-identical, not merely close.
    assert sharded["grads"] == grads
    assert sharded["weights"].keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(sharded["weights"][name], tensor), name
    initial = dict(fsdp_worker.tiny_llama().named_parameters())
    assert any(not torch.equal(initial[n], t) for n, t in weights.items())  # the weights did move


def test_sharded_parameters_refuse_another_execution_path(sharded_runs):
    # (said by the sharded job: the test process never holds a process group, or FSDP state tied to one)
    assert "sharded (FSDP2) parameters are trained on the in-place path" in (sharded_runs / "refused.txt").read_text()
