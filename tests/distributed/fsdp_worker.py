"""MeZO over FSDP2-sharded parameters, one rank of a torchrun job, or the unsharded reference in process.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/fsdp_worker.py OUT [METHOD,...]
    run_reference(METHOD) from the tests

Each rank holds a shard of every parameter (``zotune.dist.shard``: per decoder layer and the root), perturbs
and updates only that shard, and measures the loss of its half of a global batch of 8 sequences; the
losses are all-reduced (``Distributed``). The reference is one process with the whole model, taking the
mean of the two halves' losses. Rank 0 saves the gathered weights and the projected gradients.
One job trains every method it is given, each from a fresh model, in turn (one torchrun start-up for all).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest's tiny models

import zotune  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from zotune.optim import SGD, SPSA, Adam, Gaussian, LowRank, Momentum, SeparableAdam, TemporalCP, ZOOptimizer  # noqa: E402,E501

STEPS, GLOBAL_BATCH, HALVES = 6, 8, 2
EPS, QUERIES = 1e-3, 2


def batch_for(step: int) -> torch.Tensor:
    return torch.randint(0, 64, (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(1000 + step))


def half(step: int, which: int) -> torch.Tensor:
    size = GLOBAL_BATCH // HALVES
    return batch_for(step)[which * size:(which + 1) * size]


def lm_loss(model, ids) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:])


# method -> (perturbation, rule, lr). Two queries each. The dense ones draw from Philox (what sharded
# parameters are drawn from; their moments are sharded like the parameters); LOZO and TeZO draw their
# factors for the whole matrix and each rank applies its rows (nu = 3: a V window change, and LOZO-M's
# momentum carried to the new window, within the 6 steps), their moments are the whole matrix's.
METHODS = {
    "mezo": (lambda: Gaussian(generator="philox"), SGD, 1e-2),
    "mezo_momentum": (lambda: Gaussian(generator="philox"), lambda: Momentum(beta=0.9), 1e-2),
    "mezo_adam": (lambda: Gaussian(generator="philox"), Adam, 1e-3),
    "lozo": (lambda: LowRank(rank=2, nu=3), SGD, 1e-2),
    "lozo_m": (lambda: LowRank(rank=2, nu=3), lambda: Momentum(beta=0.9), 1e-2),
    "tezo": (lambda: TemporalCP(rank=3), SGD, 1e-2),
    "tezo_adam": (lambda: TemporalCP(rank=3), SeparableAdam, 1e-3),
}


def optimizer(model, method: str, execution=None) -> ZOOptimizer:
    perturbation, rule, lr = METHODS[method]
    return ZOOptimizer(model.parameters(), lr=lr, perturbation=perturbation(), rule=rule(),
                       estimator=SPSA(eps=EPS, num_queries=QUERIES), seed=7, execution=execution)


def run_reference(method: str = "mezo", losses: list | None = None) -> tuple[dict[str, torch.Tensor], list, list]:
    """(final weights, projected gradients, measured losses) of one unsharded process, step by step. With
    ``losses`` (a sharded run's), those stand in for the measurements, as ``zotune replay`` does: the
    process follows the sharded run's trajectory and still measures its own losses along it."""
    from zotune.train.replay import recorded_closure

    model = tiny_llama()
    opt = optimizer(model, method)
    grads, measured = [], []
    for step in range(STEPS):
        ours = []
        recorded = recorded_closure(losses[step]) if losses is not None else None

        def closure(step=step):
            # the mean of the halves' losses, in float64 as the all-reduce computes it
            ours.append(sum(float(lm_loss(model, half(step, w))) for w in range(HALVES)) / HALVES)
            return recorded() if recorded is not None else ours[-1]

        opt.step(closure)
        grads.append(opt.last_record.projected_grads)
        measured.append(tuple(ours))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, grads, measured


def main(out: Path, methods: list[str]) -> None:
    import torch.distributed as dist

    from zotune.dist import end_rank

    dist.init_process_group("gloo")
    for method in methods:
        train_and_save(out, method)
    say_what_sharded_parameters_refuse(out)
    # The sharded models (their FSDP state and device mesh hold the process group and gloo's pending work) are
    # gone before the group is: left to the interpreter's exit, its teardown raced gloo's threads and
    # aborted a rank now and then (SIGABRT, "terminate called without an active exception").
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    end_rank(0)  # not the interpreter's teardown, which can abort a process that used gloo (see end_rank)


def say_what_sharded_parameters_refuse(out: Path) -> None:
    """``refused.txt`` (rank 0): the error of a sharded model given to another execution path than in place
    (an optimizer is built, nothing trained); every method builds on the in-place path."""
    import torch.distributed as dist

    from zotune.dist import shard

    model = shard(tiny_llama())
    try:
        zotune.mezo(model.parameters(), lr=1e-3, execution=zotune.DriftSafe(model))
        said = "not refused"
    except ValueError as err:
        said = str(err)
    zotune.mezo_adam(model.parameters(), lr=1e-3)
    zotune.lozo(model.parameters(), lr=1e-3, rank=2)
    if dist.get_rank() == 0:
        (out / "refused.txt").write_text(said)
    del model


def train_and_save(out: Path, method: str) -> None:
    import torch.distributed as dist

    from zotune.dist import Distributed, Layout, shard

    rank, world = dist.get_rank(), dist.get_world_size()
    model = shard(tiny_llama())  # each decoder layer a unit, the rest the root's
    opt = optimizer(model, method, execution=Distributed(zotune.InPlace(), Layout(world, rank)))
    grads, losses = [], []
    for step in range(STEPS):
        opt.step(lambda step=step: lm_loss(model, half(step, rank)))
        grads.append(opt.last_record.projected_grads)
        losses.append(opt.last_record.losses)
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}  # a collective: all ranks
    if rank == 0:
        torch.save({"weights": full, "grads": grads, "losses": losses,
                    "local_numel": sum(p.to_local().numel() for p in model.parameters()),
                    "numel": sum(p.numel() for p in model.parameters())}, out / f"fsdp-{method}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "mezo").split(","))
