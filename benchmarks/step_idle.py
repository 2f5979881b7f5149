"""Where a captured MeZO step's time goes on CUDA: kernel time by kind, and the device's idle gaps.

    python benchmarks/step_idle.py opt-1.3b float16      # batch 16 x 64, as mezo_step.py runs it

Five steps (after three warm-up steps) under torch.profiler, without a synchronisation between them, as
a training loop runs them; from the kernels' timeline: the span per step, the time some kernel or copy
ran, the rest (the device idle, waiting for the host), the perturbation kernels' share and the largest
gaps between consecutive kernels.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model, make_batch  # noqa: E402
from mezo_step import captured_loss  # noqa: E402

import zotune  # noqa: E402

STEPS = 5


def main() -> None:
    shape, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    model = build_model(shape, "cuda", dtype)
    ids = make_batch(model, 16, 64, "cuda")
    optimizer = zotune.mezo(model.parameters(), lr=1e-7, eps=1e-3, seed=0)
    loss = captured_loss(model, ids)
    with torch.no_grad():
        for _ in range(3):
            optimizer.step(loss)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(STEPS):
                optimizer.step(loss)
            torch.cuda.synchronize()
    path = tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(path)
    events = json.load(open(path))["traceEvents"]
    os.remove(path)
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    start, end = kernels[0]["ts"], kernels[-1]["ts"] + kernels[-1]["dur"]
    busy, cursor, gaps = 0.0, start, []  # microseconds
    for e in kernels:
        if e["ts"] > cursor:
            gaps.append(e["ts"] - cursor)
        busy += max(0.0, e["ts"] + e["dur"] - max(e["ts"], cursor))
        cursor = max(cursor, e["ts"] + e["dur"])
    perturb = [e["dur"] for e in kernels if "_perturb_" in e["name"]]
    print(f"{shape}: span {(end - start) / STEPS / 1000:.3f} ms a step, busy {busy / STEPS / 1000:.3f}, "
          f"idle {(end - start - busy) / STEPS / 1000:.3f}; perturbation kernels {sum(perturb) / STEPS / 1000:.3f} ms "
          f"({len(perturb) / STEPS:g} launches a step)")
    print("largest gaps (µs):", [round(g, 1) for g in sorted(gaps, reverse=True)[:8]])


if __name__ == "__main__":
    main()
