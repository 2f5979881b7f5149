"""How much the captured forwards' length buckets pad a task's training batches.

    python benchmarks/padding.py                      # SST-2, SmolLM2's tokenizer, batches of 16
    python benchmarks/padding.py --data.task rte --batch 8 --buckets 8,16,32

A captured forward (``train.cuda_graphs``) runs at a bucketed length: the batch's longest row
(prompt and candidate) is left-padded to ``padded_length(longest, bucket)``, and the network's
work grows with it. For random batches of the task's training examples this prints the padded
length over the longest row, on average, for each bucket, and the number of distinct shapes (one
CUDA graph each). Takes ``zotune train``'s data and model flags; reads the tokenizer, not the weights.
"""

from __future__ import annotations

import argparse
import random
import statistics

from zotune.cli import parse_config
from zotune.eval.scoring import encode
from zotune.models.captured import padded_length
from zotune.train.setup import task_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2000, help="random batches drawn")
    parser.add_argument("--buckets", default="32,8", help="comma-separated bucket sizes to compare")
    args, rest = parser.parse_known_args()
    cfg = parse_config(rest)
    from transformers import AutoTokenizer

    from zotune.models.loading import resolve

    _, splits, masked = task_splits(cfg)
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.name)[0], trust_remote_code=cfg.model.trust_remote_code)
    rows = encode(tokenizer, splits.train, cfg.model.max_length, masked)
    lengths = [len(r.prompt) + max(len(c) for c in r.candidates) for r in rows]
    print(f"{cfg.data.task}: {len(lengths)} training examples, prompt and candidate {statistics.mean(lengths):.1f} "
          f"tokens on average, {max(lengths)} at most; {args.batches} random batches of {args.batch}")
    rng = random.Random(0)
    longest = [max(rng.sample(lengths, args.batch)) for _ in range(args.batches)]
    print("| bucket | padded / longest row (mean) | shapes |")
    print("|---|---|---|")
    for bucket in (int(b) for b in args.buckets.split(",")):
        padded = [padded_length(n, bucket) for n in longest]
        ratio = statistics.mean(p / n for p, n in zip(padded, longest))
        print(f"| {bucket} | {ratio:.2f}x | {len(set(padded))} |")


if __name__ == "__main__":
    main()
