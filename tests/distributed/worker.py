"""Runs ZO steps on a tiny LLaMA, in one process or as one rank of a torchrun job.

    python tests/distributed/worker.py OUT_DIR QUERY_SHARDS            # under torchrun: parallel
    run_case(case) from the tests                               # in process: the reference

Each case trains 20 steps on a global batch of 8 fixed random sequences per step and saves the
weights to OUT_DIR/<case>-rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest's tiny models

import zotune  # noqa: E402
from conftest import tiny_llama  # noqa: E402

STEPS, GLOBAL_BATCH = 20, 8
CASES = {
    "mezo": dict(method="mezo", kw=dict(lr=1e-2)),
    "mezo_q4": dict(method="mezo", kw=dict(lr=1e-2, num_queries=4)),
    "mezo_adam": dict(method="mezo_adam", kw=dict(lr=1e-3)),
    "lozo_virtual": dict(method="lozo", kw=dict(lr=1e-2, rank=2, nu=5, num_queries=2), virtual=True),
    "tezo_q3": dict(method="tezo", kw=dict(lr=1e-2, rank=2, num_queries=3)),
    "adazeta": dict(method="adazeta", kw=dict(lr=1e-2, q_alpha=2.0, q_max=3, q_beta=1.0)),
}


def batch_for(step: int) -> torch.Tensor:
    return torch.randint(0, 64, (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(1000 + step))


def run_case(name: str, layout=None, query_parallel: bool = False) -> dict[str, torch.Tensor]:
    case = CASES[name]
    model = tiny_llama()
    if case.get("virtual"):  # the virtual path perturbs Linear/Embedding weights; freeze RMSNorm scales
        for n, p in model.named_parameters():
            p.requires_grad_("norm" not in n)
    params = [p for p in model.parameters() if p.requires_grad]
    if case.get("virtual"):
        execution = zotune.Virtual(model)
    elif query_parallel:
        execution = zotune.DriftSafe(model)  # query shards must not write the weights while measuring
    else:
        execution = zotune.InPlace()
    if layout is not None:
        from zotune.dist import Distributed

        execution = Distributed(execution, layout)
    optimizer = zotune.METHODS[case["method"]](params, **case["kw"], seed=3, execution=execution)
    for step in range(STEPS):
        optimizer.start_epoch(step // 5)  # 5 steps per "epoch" (AdaZeta's q: 1, 2, 3, 3)
        ids = batch_for(step)
        if layout is not None:
            ids = torch.stack(layout.shard_batch(list(ids)))

        def closure(copies=None, ids=ids):
            batch = ids.repeat(copies or 1, 1)
            positions = torch.arange(batch.shape[1]).expand_as(batch)
            logits = model(input_ids=batch, position_ids=positions).logits[:, :-1]
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            # Per-example losses do not depend on the batch size here; averaging them in float64
            # keeps the mean of two half-batch means equal to the whole-batch mean to ~1e-16, which
            # the 1/(2ε) of the estimate would otherwise amplify from float32's ~1e-7.
            losses = losses.mean(1).double()
            return losses.mean() if copies is None else losses.view(copies, -1).mean(1)

        optimizer.step(closure)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def main() -> None:
    import torch.distributed as dist

    from zotune.dist import Layout, end_rank

    dist.init_process_group("gloo")
    jobs = sys.argv[1:]  # (folder, query shards, cases) for each layout the job runs, one start-up for all
    for out, query_shards, cases in zip(jobs[0::3], jobs[1::3], jobs[2::3]):
        layout = Layout(dist.get_world_size(), dist.get_rank(), int(query_shards))
        for name in cases.split(","):
            torch.save(run_case(name, layout, int(query_shards) > 1), Path(out) / f"{name}-rank{layout.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    end_rank(0)  # not the interpreter's teardown, which can abort a process that used gloo (see end_rank)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
