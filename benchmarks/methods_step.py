"""Step time and peak memory of every ZO method, in place and virtual, side by side.

One process times all variants on the same model and batches (interleaved, median), against
in-place MeZO; peak memory is measured for each variant in a fresh subprocess. Trainable
parameters are the same for every variant: all weights except norms and positional embeddings
(the virtual path leaves those to be frozen; they are 0.03% of the parameters at these shapes).

Usage:
  python benchmarks/methods_step.py                       # SmolLM2-135M shape, CPU, batches 1, 4, 16
  python benchmarks/methods_step.py --device cuda --shape opt-1.3b --batches 1,4,16
  python benchmarks/methods_step.py --batches 16 --copies-per-forward 1   # + virtual LOZO/TeZO, k copies a forward
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, build_model, loss_of, make_batch, peak_read, peak_reset, timed  # noqa: E402

LOW_RANK = {"lozo": {"rank": 2}, "lozo_m": {"rank": 2}, "tezo": {"rank": 32}, "tezo_m": {"rank": 32},
            "tezo_adam": {"rank": 32}}
VARIANTS = ["mezo", "mezo_momentum", "mezo_adam"] + [
    f"{name}{suffix}" for name in LOW_RANK for suffix in ("", "+virtual")
]
QUICK = ["mezo", "lozo", "lozo+virtual", "tezo", "tezo+virtual"]  # timed at batch sizes outside --all-at


def make_optimizer(variant: str, model):
    import zotune

    name, _, path = variant.partition("+")  # path: "", "virtual" or "virtual/k" (k copies per forward)
    for pname, p in model.named_parameters():
        p.requires_grad_(not ("norm" in pname or "embed_positions" in pname))
    params = [p for p in model.parameters() if p.requires_grad]
    lr = 1e-5 if "adam" in name else 1e-7
    options = dict(LOW_RANK.get(name, {}))
    if path.startswith("virtual"):
        per = path.partition("/")[2]
        options.update(execution=zotune.Virtual(model, copies_per_forward=int(per) if per else None))
    return zotune.METHODS[name](params, lr=lr, eps=1e-3, seed=0, **options)


def step_fn(variant: str, model, ids):
    optimizer = make_optimizer(variant, model)
    return lambda: optimizer.step(lambda copies=None: loss_of(model, ids, copies))


def speed(args, model, batch: int, variants: list[str]) -> dict[str, tuple[float, float]]:
    """Per variant: (median seconds per step, median over rounds of its time / MeZO's in that round).

    Each round times a block of consecutive steps of every variant, back to back; the ratio is
    taken within a round, so that a host whose speed drifts during the run (shared machines,
    GPU hosts whose launch rate wanders) moves both sides of each ratio together.
    """
    ids = make_batch(model, batch, args.tokens, args.device)
    steps = {v: step_fn(v, model, ids) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    with torch.no_grad():
        for fn in steps.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for v, fn in steps.items():  # a block of consecutive steps per variant, blocks interleaved
                # One timing (one GPU synchronisation) per block: a training loop runs steps back to
                # back, so one step's trailing kernels overlap the next step's host work.
                times[v].append(timed(lambda: [fn() for _ in range(args.block)], args.device) / args.block)
    return {v: (statistics.median(t), statistics.median(a / b for a, b in zip(t, times["mezo"])))
            for v, t in times.items()}


def memory_child(args) -> float:
    model = build_model(args.shape, args.device, getattr(torch, args.dtype))
    ids = make_batch(model, args.memory_batch, args.tokens, args.device)
    fn = step_fn(args.memory_variant, model, ids)
    with torch.no_grad():
        fn()  # first step allocates moments and caches: measure steady-state steps after it
        peak_reset(args.device)
        for _ in range(args.memory_steps):
            fn()
    return peak_read(args.device)


def memory(args, variant: str, batch: int) -> float:
    cmd = [sys.executable, __file__, "--memory-variant", variant, "--memory-batch", str(batch), "--shape", args.shape,
           "--tokens", str(args.tokens), "--device", args.device, "--dtype", args.dtype,
           "--memory-steps", str(args.memory_steps)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=1,
                        help="consecutive steps per timing sample, timed as a whole (mean per step)")
    parser.add_argument("--all-at", default="1,4,16",
                        help="batch sizes at which every variant is timed and its peak memory measured (others: "
                             "MeZO, LOZO and TeZO, time only)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--copies-per-forward", type=int, default=None,
                        help="also time virtual LOZO and TeZO with at most this many of the step's copies per forward")
    parser.add_argument("--memory-steps", type=int, default=1,
                        help="steps measured for peak memory, after one warm-up step")
    parser.add_argument("--memory-variant", default=None,
                        help="only print this variant's peak memory (JSON; the table runs one process per variant)")
    parser.add_argument("--memory-batch", type=int, default=4, help="batch size of --memory-variant")
    args = parser.parse_args()
    if args.memory_variant:
        print(json.dumps({"peak_mib": memory_child(args)}))
        return

    model = build_model(args.shape, args.device, getattr(torch, args.dtype))
    where = f"{args.shape} shape, {args.tokens} tokens per sequence, {args.dtype}, {args.device}"
    if args.device == "cpu":
        where += f", {torch.get_num_threads()} threads"
    rows = []
    all_at = {int(b) for b in args.all_at.split(",") if b}
    per = args.copies_per_forward
    split = [] if per is None else [f"{n}+virtual/{per}" for n in ("lozo", "tezo")]
    for batch in [int(b) for b in args.batches.split(",")]:
        variants = (VARIANTS if batch in all_at else QUICK) + split
        times = speed(args, model, batch, variants)
        for v in variants:
            peak = None if args.no_memory or batch not in all_at else memory(args, v, batch)
            rows.append((batch, v, *times[v], peak))
        print(f"batch {batch} done", file=sys.stderr, flush=True)
    sample = f"blocks of {args.block} steps" if args.block > 1 else "steps"
    print(f"\nZO step time and peak memory ({where}; median of {args.repeats} {sample}, interleaved; "
          "ratio: median of the per-round ratios)")
    print("| batch | method | path | s / step | vs in-place MeZO | peak MiB |\n|---|---|---|---|---|---|")
    for batch, v, seconds, ratio, peak in rows:
        name, _, path = v.partition("+")
        path = path.replace("/", ", copies per forward: ")
        print(f"| {batch} | {name} | {path or 'in place'} | {seconds:.3f} | {ratio:.2f}x | "
              f"{'' if peak is None else f'{peak:.0f}'} |")


if __name__ == "__main__":
    main()
