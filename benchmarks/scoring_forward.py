"""The scoring forwards of a ZO step and of an evaluation, on the real models, weights frozen.

    python benchmarks/scoring_forward.py                      # this checkout
    PYTHONPATH=/path/to/other/src python benchmarks/scoring_forward.py   # another version, to compare

Times, on 2 threads (median of ``--repeats``), without grad and with every weight frozen as in a ZO
run: SmolLM2-135M's training loss over 16 SST-2 training examples (``gold_lm_loss``: the gold
word's row and the one before it are scored), its candidate scores over 32 (``candidate_scores``:
one position), and MiniLM-L6's masked-LM candidate scores over 32 (its head is newly initialised:
the package carries the encoder only, so the time counts, not the scores). Data: the SST-2 files
found as ``zotune train`` finds them (``$ZOTUNE_DATA``, ``../shared/data``...).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import zotune
from zotune.eval.scoring import candidate_scores, encode, gold_lm_loss
from zotune.models.loading import load_model
from zotune.tasks import get_task, load_splits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_time  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"zotune from {zotune.__file__}")
    task = get_task("sst2")
    for name, kind in (("smollm2-135m", "causal"), ("minilm-l6", "masked")):
        model, tokenizer = load_model(name, kind=kind)
        model.requires_grad_(False)
        masked = kind == "masked"
        examples = load_splits(task, None, n_train=32, n_dev=0, n_test=0, masked=masked).train
        batch = encode(tokenizer, examples, masked=masked)
        pad = tokenizer.pad_token_id
        with torch.no_grad():
            if not masked:
                ms = 1000 * median_time(lambda: gold_lm_loss(model, batch[:16], pad), "cpu", args.repeats)
                print(f"{name}: training loss, 16 examples: {ms:.1f} ms")
            ms = 1000 * median_time(lambda: candidate_scores(model, batch, pad), "cpu", args.repeats)
            print(f"{name}: candidate scores, 32 examples: {ms:.1f} ms")


if __name__ == "__main__":
    main()
