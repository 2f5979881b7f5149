"""Data- and query-parallel ZO on 2 CPU processes (gloo) against one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import worker

WORKER = Path(worker.__file__)


def torchrun_command(*args: str) -> list[str]:
    """torchrun on 2 local processes. ``--standalone`` lets the rendezvous bind a port the OS picks: a port
    probed free and then closed (the way these tests found one before) can be taken by another process
    before torchrun binds it, which failed a run now and then."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def torchrun(*jobs: tuple[Path, int, list[str]]) -> None:
    """One torchrun job of the worker running each (folder, query shards, cases) in turn."""
    cmd = torchrun_command(str(WORKER), *(str(arg) for out, shards, cases in jobs for arg in (out, shards,
                                                                                            ",".join(cases))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


DATA_PARALLEL = ["mezo", "mezo_adam", "lozo_virtual", "tezo_q3", "adazeta"]
QUERY_PARALLEL = ["mezo_q4", "tezo_q3", "adazeta", "mezo"]  # mezo: q = 1, so rank 1 measures nothing


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data, query = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("query")
    torchrun((data, 1, DATA_PARALLEL), (query, 2, QUERY_PARALLEL))
    return {"data": data, "query": query}


def assert_close(a, b, exact=False):
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", DATA_PARALLEL)
def test_data_parallel_matches_one_process(runs, case):
    rank0 = torch.load(runs["data"] / f"{case}-rank0.pt")
    rank1 = torch.load(runs["data"] / f"{case}-rank1.pt")
    assert_close(rank0, rank1, exact=True)  # every rank applied the identical update
    single = worker.run_case(case)
    # Each rank averages the loss over half the batch and the halves are averaged: the same mean
    # as one process over the whole batch up to float64 rounding (~1e-16 relative; x 1/(2ε) in g),
    # so the float32 weights agree to a few ulps.
    assert_close(rank0, single)
    initial = worker.tiny_llama()
    assert any(not torch.equal(initial.state_dict()[n], rank0[n]) for n in rank0)  # it trained


@pytest.mark.parametrize("case", QUERY_PARALLEL)
def test_query_parallel_matches_one_process(runs, case):
    rank0 = torch.load(runs["query"] / f"{case}-rank0.pt")
    rank1 = torch.load(runs["query"] / f"{case}-rank1.pt")
    assert_close(rank0, rank1, exact=True)
    # Each query's losses are measured by one rank on the whole batch, exactly as in one process
    # (the all-reduce adds zeros and divides by 1), so the weights are bit-identical to a
    # drift-safe single-process run.
    assert_close(rank0, worker.run_case(case, query_parallel=True), exact=True)


def test_layout_and_batch_shards():
    from zotune.dist import Layout

    layout = Layout(world_size=4, rank=3, query_shards=2)
    assert (layout.data_shards, layout.data_shard, layout.query_shard) == (2, 1, 1)
    assert layout.shard_batch(list(range(8))) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="equal data shards"):
        layout.shard_batch(list(range(7)))
    with pytest.raises(ValueError, match="divide the world size"):
        Layout(world_size=4, rank=0, query_shards=3)
