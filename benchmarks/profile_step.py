"""Where one ZO step spends its time: torch.profiler's top operators for a variant of methods_step.py.

    python benchmarks/profile_step.py --variant lozo+virtual --device cuda --shape opt-1.3b --dtype float16
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_model, make_batch  # noqa: E402
from methods_step import step_fn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="lozo+virtual")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    model = build_model(args.shape, args.device, getattr(torch, args.dtype))
    step = step_fn(args.variant, model, make_batch(model, args.batch, args.tokens, args.device))
    with torch.no_grad():
        step()
        step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            if args.device == "cuda":
                torch.cuda.synchronize()
    key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
