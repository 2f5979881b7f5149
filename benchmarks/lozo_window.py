"""What a new V window costs a LOZO step: step times across window starts, side by side with the steps
between them.

    python benchmarks/lozo_window.py --device cuda --shape llama-2-7b --dtype bfloat16
    python benchmarks/lozo_window.py                      # SmolLM2-135M shape, CPU

LOZO draws a new V for every matrix each ν steps; the step that starts a window also rebuilds the
plan of its passes (on CUDA, the low-rank kernel's launch tables). Timed: 3 windows of ``--nu`` steps
after a first window of warm-up (the forwards captured, as ``zotune train`` runs them on CUDA), each
step synchronised. Printed: the median step inside windows, each window's first step, and what the
window starts add to a step on average at the default ν = 50.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, build_model, loss_of, make_batch, timed  # noqa: E402
from mezo_step import captured_loss  # noqa: E402

import zotune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--nu", type=int, default=10)
    args = parser.parse_args()

    model = build_model(args.shape, args.device, getattr(torch, args.dtype))
    ids = make_batch(model, args.batch, args.tokens, args.device)
    loss = captured_loss(model, ids) if args.device.startswith("cuda") else (lambda: loss_of(model, ids))
    optimizer = zotune.lozo(model.parameters(), lr=1e-7, eps=1e-3, nu=args.nu, seed=0)
    with torch.no_grad():
        times = [timed(lambda: optimizer.step(loss), args.device) for _ in range(4 * args.nu)]
    timed_steps = times[args.nu:]  # the first window: warm-up
    starts = timed_steps[::args.nu]
    inside = statistics.median(t for i, t in enumerate(timed_steps) if i % args.nu)
    extra = statistics.mean(starts) - inside
    print(f"\nLOZO step ({args.shape} shape, {args.dtype}, batch {args.batch} x {args.tokens}, {args.device}, "
          f"nu = {args.nu})")
    print(f"median step inside windows: {1000 * inside:.1f} ms")
    print("first steps of windows: " + ", ".join(f"{1000 * t:.1f} ms" for t in starts))
    print(f"a window start adds {1000 * extra:.1f} ms: {100 * extra / 50 / inside:.1f}% of a step on average "
          "at nu = 50")


if __name__ == "__main__":
    main()
