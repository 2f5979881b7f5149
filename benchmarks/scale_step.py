"""Models larger than one GPU: a MeZO step sharded with FSDP2, split by ``device_map``, offloaded to CPU
memory under a capped GPU, against the same step on one device, side by side in one run.

Each variant runs in a process of its own (torchrun for FSDP2), builds the model with random weights
on its devices, takes ``--repeats`` MeZO steps after two warm-up steps and prints the median step
time and the peak memory of each device. The batch is the same global batch everywhere (FSDP2's
ranks take half of it each: data parallel over the shards, as ``--train.sharding fsdp`` runs).

    python benchmarks/scale_step.py --device cuda --shape llama-2-7b --dtype bfloat16 --batch 16 --tokens 256
    python benchmarks/scale_step.py --variants single,fsdp,offload          # CPU stand-in, tiny shape

``device_map`` splits a LLaMA-shaped model's layers in halves over cuda:0 and cuda:1 (accelerate's
hooks move the activations), the way ``--model.device_map auto`` spreads a model too large for one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

VARIANTS = ("single", "fsdp", "device_map", "offload")


def worker(args) -> None:
    from common import build_model, loss_of, make_batch, peak_read, peak_reset, timed  # noqa: F401

    import zotune
    from zotune.optim.offload import Offload, place, repeated_blocks

    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype)
    rank, world = 0, 1
    if args.variant == "fsdp":
        import torch.distributed as dist

        from zotune.dist import Distributed, Layout, shard

        local = int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{rank}" if cuda else "cpu"
    model = build_model(args.shape, device, dtype)
    ids = make_batch(model, args.batch, args.tokens, device)
    execution = zotune.InPlace()
    note = ""
    if args.variant == "fsdp":
        model = shard(model)
        ids = ids[rank * args.batch // world: (rank + 1) * args.batch // world]  # this rank's data shard
        execution = Distributed(zotune.InPlace(), Layout(world, rank))
    elif args.variant == "device_map":
        from accelerate import dispatch_model

        layers = len(repeated_blocks(model))
        where = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
        where.update({f"model.layers.{i}": int(i >= layers // 2) for i in range(layers)})
        model = dispatch_model(model, device_map=where)
    elif args.variant == "offload":
        for block in repeated_blocks(model):
            block.to("cpu")
        model = place(model, device)
        execution = Offload(model, device)
        if cuda:
            torch.cuda.empty_cache()
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            cap = args.offload_cap * weights / torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(cap, device)
            capped = weights * args.offload_cap / 2**30
            note = f"GPU capped at {args.offload_cap:g}x the weights ({capped:.1f} GiB)"
    copies = args.variant == "offload"  # the offload path measures both points in one forward over copies
    optimizer = zotune.mezo(model.parameters(), lr=1e-7, eps=1e-3, execution=execution)

    def closure(copies_=None):
        return loss_of(model, ids, copies_) if copies else loss_of(model, ids)

    step = (lambda: optimizer.step(lambda copies=None: closure(copies))) if copies else \
        (lambda: optimizer.step(closure))
    devices = [device] if args.variant != "device_map" else ["cuda:0", "cuda:1"]
    for d in devices:
        if cuda:
            torch.cuda.reset_peak_memory_stats(d)
    if not cuda:
        peak_reset("cpu")
    for _ in range(2):
        step()
    times = [timed(step, device) for _ in range(args.repeats)]
    if args.profile and rank == 0:  # one more step under torch.profiler: where a slow variant waits
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            timed(step, device)
        Path(args.profile).write_text(f"{args.variant}\n" + prof.key_averages().table(sort_by="cpu_time_total",
                                                                                      row_limit=25))
    if rank == 0:
        print("RESULT " + json.dumps({
            "variant": args.variant, "step_s": statistics.median(times), "note": note,
            "peak_gib": [round((torch.cuda.max_memory_allocated(d) / 2**30) if cuda else peak_read(d) / 2**10, 2)
                         for d in devices]}), flush=True)
    if args.variant == "fsdp":
        from zotune.dist import end_rank

        torch.distributed.destroy_process_group()
        end_rank(0)  # not the interpreter's teardown, which can abort a process that used gloo


def launch(args, variant: str) -> dict:
    flags = ["--worker", "--variant", variant, "--device", args.device, "--shape", args.shape, "--dtype", args.dtype,
             "--batch", str(args.batch), "--tokens", str(args.tokens), "--repeats", str(args.repeats),
             "--offload-cap", str(args.offload_cap)]
    if args.profile:
        flags += ["--profile", f"{args.profile}.{variant}"]
    if variant == "fsdp":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__] + flags
    else:
        cmd = [sys.executable, __file__] + flags
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"variant": variant, "error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(lines[0][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="opt-1.3b-narrow")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", help="also profile one step of each variant into PROFILE.<variant>")
    parser.add_argument("--offload-cap", type=float, default=0.5,
                        help="offload: cap the GPU at this fraction of the model's weight bytes")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = [launch(args, v) for v in args.variants.split(",")]
    base = next((r for r in rows if r["variant"] == "single" and "error" not in r), None)
    print(f"MeZO step, {args.shape} shape, {args.dtype}, {args.device}, global batch {args.batch} x {args.tokens}")
    print("| variant | step s | vs one device | peak memory per device (GiB) | vs one device | note |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['variant']} | failed | | | | {row['error'].splitlines()[-1] if row['error'] else ''} |")
            continue
        time_ratio = f"{row['step_s'] / base['step_s']:.2f}x" if base else ""
        mem_ratio = f"{max(row['peak_gib']) / max(base['peak_gib']):.2f}x" if base and max(base['peak_gib']) else ""
        print(f"| {row['variant']} | {row['step_s']:.3f} | {time_ratio} | {', '.join(map(str, row['peak_gib']))} | "
              f"{mem_ratio} | {row['note']} |")
    for row in rows:
        if "error" in row:
            print(f"\n{row['variant']} failed:\n{row['error']}", file=sys.stderr)


if __name__ == "__main__":
    main()
