"""Where a step of ``zotune train`` spends its time: torch.profiler over a few steps of the real loop.

    python benchmarks/profile_training.py --model.device cuda --optim.trainable all --optim.method mezo

Takes ``zotune train``'s flags. Builds the run as the CLI does (a run folder under /tmp), takes 10
warm-up steps (CUDA graphs are captured there), then profiles 5 and prints the operators by host
time and, on CUDA, by device time, and the wall time per step.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from zotune.cli import parse_config
from zotune.config import apply_overrides
from zotune.dist.context import start
from zotune.train.loop import Training


def main() -> None:
    cfg = parse_config(sys.argv[1:])
    cfg = apply_overrides(cfg, {"train.output_dir": tempfile.mkdtemp(), "train.progress": "false",
                                "train.zero_shot": "false", "train.eval_every": "0"})
    cuda = cfg.model.device.startswith("cuda")
    with Training(cfg, start(cfg.model.device, 600.0), say=print) as run:
        for step in range(10):
            run.step(step)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        began = time.perf_counter()
        with profile(activities=activities) as prof:
            for step in range(10, 15):
                run.step(step)
            sync()
        wall = (time.perf_counter() - began) / 5
    print(f"wall time per step while profiled: {1000 * wall:.1f} ms")
    averages = prof.key_averages()
    print(averages.table(sort_by="cpu_time_total", row_limit=30))
    if cuda:
        print(averages.table(sort_by="cuda_time_total", row_limit=20))


if __name__ == "__main__":
    main()
