"""Data-parallel ZO steps over torch.distributed: step time for 1..N processes and bytes exchanged.

Launches ``torchrun --nproc_per_node N`` for each N in --nprocs; every rank takes 1/N of a fixed
global batch (SmolLM2-135M or OPT-1.3B shape, random weights) and runs MeZO steps. Printed per N:
the median step time (rank 0), the bytes one rank puts into the step's all-reduce (the loss and
count of each measuring point, float64), and what first-order DDP would all-reduce for the same
model (every trainable gradient in the weights' dtype).

    python benchmarks/dist_step.py --nprocs 1,2                              # CPU, gloo
    python benchmarks/dist_step.py --device cuda --shape opt-1.3b --dtype float16 --nprocs 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch


def worker(args) -> None:
    import torch.distributed as dist

    from common import build_model, loss_of, make_batch, timed

    import zotune
    from zotune.dist import Distributed, Layout, end_rank

    backend = "nccl" if args.device == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    model = build_model(args.shape, device, getattr(torch, args.dtype))
    ids = make_batch(model, args.batch, args.tokens, device)
    layout = Layout(world, rank)
    shard = torch.stack(layout.shard_batch(list(ids)))
    inner = zotune.DriftSafe(model) if args.dtype != "float32" else zotune.InPlace()
    optimizer = zotune.mezo(model.parameters(), lr=1e-7, execution=Distributed(inner, layout))
    step = lambda: optimizer.step(lambda: loss_of(model, shard))  # noqa: E731
    step()
    times = [timed(step, device) for _ in range(args.repeats)]
    if rank == 0:
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        print("RESULT " + json.dumps({"nproc": world, "step_s": statistics.median(times),
                                      "zo_bytes": optimizer.execution.bytes_last_step, "ddp_bytes": trainable}))
    dist.destroy_process_group()
    end_rank(0)  # not the interpreter's teardown, which can abort a process that used gloo


def launch(args, nproc: int) -> dict:
    threads = max(1, (os.cpu_count() or 1) // nproc) if args.device == "cpu" else 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), __file__,
           "--worker", "--device", args.device, "--shape", args.shape, "--dtype", args.dtype, "--batch",
           str(args.batch), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"torchrun with {nproc} processes failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = [launch(args, int(n)) for n in args.nprocs.split(",")]
    base = rows[0]["step_s"]
    print(f"MeZO, {args.shape} shape, {args.dtype}, {args.device}, global batch {args.batch} x {args.tokens} tokens")
    print("| processes | step s | speed-up | bytes all-reduced per step (ZO) | DDP would all-reduce |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['nproc']} | {row['step_s']:.3f} | {base / row['step_s']:.2f}x | {row['zo_bytes']} | "
              f"{row['ddp_bytes']:,} ({row['ddp_bytes'] / row['zo_bytes']:.1e}x) |")


if __name__ == "__main__":
    main()
