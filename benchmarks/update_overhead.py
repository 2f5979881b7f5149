"""What a ZO step costs beside its forwards when the tensors are many and small: the host's share.

A 30-layer LLaMA with hidden size 16 has SmolLM2-135M's 273 tensors at almost no arithmetic, so
the time a step adds to its two forwards is the host issuing the perturbation passes and the
rule's update, the cost that a GPU step pays in launches. Each method's step and two forwards are
timed in one process (median of 20 after 3 warm-up steps), on the CPU.

    python benchmarks/update_overhead.py --methods mezo,mezo_momentum,mezo_adam
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import zotune


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
    args = parser.parse_args()
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(0))
    print("| method | tensors | step ms | two forwards ms | step minus forwards ms |\n|---|---|---|---|---|")
    for name in args.methods.split(","):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
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
