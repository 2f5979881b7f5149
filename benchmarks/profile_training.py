"""Where a step of ``zotune train`` spends its time: torch.profiler over a few steps of the real loop.

    python benchmarks/profile_training.py --model.device cuda --optim.trainable all --optim.method mezo
    python benchmarks/profile_training.py --breakdown out/mezo.json --model.device cuda ...

Takes ``zotune train``'s flags. Builds the run as the CLI does (a run folder under /tmp), takes 40
warm-up steps (CUDA graphs are captured there: one per padded length, and a task's batches come in
several lengths), then profiles 5 and prints the operators by host
time and, on CUDA, by device time, then times 20 steps without the profiler (the wall time per
step). ``--breakdown FILE`` (first) also writes a step's time split three ways, for
``plot_step_breakdown.py``: device time in the perturbation kernels (the fused Gaussian and
low-rank kernels), device time in every other kernel (the forwards and the loss), and the rest of
the wall time (the GPU idle while the host works).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from zotune.cli import parse_config
from zotune.config import apply_overrides
from zotune.dist.context import start
from zotune.optim.fused import _perturb_edges, _perturb_inside
from zotune.optim.lowrank_kernel import _lowrank_kernel
from zotune.train.loop import Training

# The perturbation kernels' names as the profiler reports them, taken from the kernels themselves so
# that a renamed kernel cannot drop out of the count unnoticed.
PERTURBATION_KERNELS = tuple(kernel.fn.__name__ for kernel in (_perturb_inside, _perturb_edges, _lowrank_kernel))
WARM_UP = 40  # steps before the profile: SST-2's batches of 16 come in six padded lengths, each captured once


def breakdown(averages, wall: float, steps: int) -> dict:
    """ms per step: perturbation kernels, other kernels, and the wall time the device was not busy.

    Only the device's own events count (kernels, copies): a host operator's "self device time" is the
    time of the kernels it launched, which appear again as events of their own. ``wall`` is a step's
    time measured without the profiler, whose host overhead would otherwise show as idle device.
    """
    from torch.autograd import DeviceType

    # (a host range such as ``Optimizer.step#...`` also appears on the device's timeline, spanning the
    # kernels it launched: it shares its name with the host event and is left out, or they count twice)
    host = {e.key for e in averages if e.device_type == DeviceType.CPU}
    kernels = [e for e in averages if e.device_type != DeviceType.CPU and e.key not in host]

    def device_ms(entry) -> float:
        return entry.self_device_time_total / 1000 / steps

    perturbation = sum(device_ms(e) for e in kernels if any(k in e.key for k in PERTURBATION_KERNELS))
    busy = sum(device_ms(e) for e in kernels)
    return {"wall_ms": 1000 * wall, "perturbation_ms": perturbation, "other_device_ms": busy - perturbation,
            "idle_ms": max(1000 * wall - busy, 0.0)}


def main() -> None:
    out = None
    if sys.argv[1:2] == ["--breakdown"]:
        out, sys.argv[1:3] = sys.argv[2], []
    cfg = parse_config(sys.argv[1:])
    cfg = apply_overrides(cfg, {"train.output_dir": tempfile.mkdtemp(), "train.progress": "false",
                                "train.zero_shot": "false", "train.eval_every": "0"})
    cuda = cfg.model.device.startswith("cuda")
    with Training(cfg, start(cfg.model.device, 600.0), say=print) as run:
        for step in range(WARM_UP):
            run.step(step)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        began = time.perf_counter()
        with profile(activities=activities) as prof:
            for step in range(WARM_UP, WARM_UP + 5):
                run.step(step)
            sync()
        profiled = (time.perf_counter() - began) / 5
        began = time.perf_counter()
        for step in range(WARM_UP + 5, WARM_UP + 25):
            run.step(step)
        sync()
        wall = (time.perf_counter() - began) / 20
    print(f"wall time per step: {1000 * wall:.1f} ms ({1000 * profiled:.1f} ms while profiled)")
    averages = prof.key_averages()
    print(averages.table(sort_by="cpu_time_total", row_limit=30))
    if cuda:
        print(averages.table(sort_by="cuda_time_total", row_limit=20))
    if out is not None:
        split = {"variant": f"{cfg.optim.method}", **breakdown(averages, wall, 5)}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(split))
        print(json.dumps(split))


if __name__ == "__main__":
    main()
