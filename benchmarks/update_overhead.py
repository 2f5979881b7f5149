"""What a ZO step costs beside its forwards when the tensors are many and small: the host's share.

A 30-layer LLaMA with hidden size 16 has SmolLM2-135M's 273 tensors at almost no arithmetic, so
the time a step adds to its two forwards is the host issuing the perturbation passes and the
rule's update, the cost that a GPU step pays in launches. Each method's step and two forwards are
timed in one process (median of 20 after 3 warm-up steps), on the CPU.

    python benchmarks/update_overhead.py --methods mezo,mezo_momentum,mezo_adam
    python benchmarks/update_overhead.py --shape smollm2-135m --methods mezo_adam --repeats 5   # real sizes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import zotune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, build_model, make_batch  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="mezo,mezo_momentum,mezo_adam")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shape", default="tiny", choices=["tiny", *sorted(SHAPES)],
                        help="tiny: 273 small tensors; a named shape: that model's sizes, batch 1 x 16 tokens")
    args = parser.parse_args()
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    print("| method | tensors | step ms | two forwards ms | step minus forwards ms |\n|---|---|---|---|---|")
    for name in args.methods.split(","):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config) if args.shape == "tiny" else build_model(args.shape, "cpu", torch.float32)
        ids = make_batch(model, 1, 4 if args.shape == "tiny" else 16, "cpu")
        optimizer = zotune.METHODS[name](list(model.parameters()), lr=1e-4, seed=0)

        def closure():
            return model(input_ids=ids, labels=ids).loss

        for _ in range(3):
            optimizer.step(closure)
        step = median_seconds(lambda: optimizer.step(closure), args.repeats)
        with torch.no_grad():
            forwards = median_seconds(lambda: (closure(), closure()), args.repeats)
        print(f"| {name} | {len(list(model.parameters()))} | {1000 * step:.1f} | {1000 * forwards:.1f} | "
              f"{1000 * (step - forwards):.1f} |")


if __name__ == "__main__":
    main()
