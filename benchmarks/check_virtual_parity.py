"""Check on any device that the virtual path measures the in-place path's projected gradients.

Usage: python benchmarks/check_virtual_parity.py --device cuda --shape opt-1.3b --dtype float32
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, build_model, loss_of, make_batch  # noqa: E402


def main() -> None:
    import zotune

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    for method in ("lozo", "tezo"):
        grads = {}
        for virtual in (False, True):
            model = build_model(args.shape, args.device, getattr(torch, args.dtype))
            for name, p in model.named_parameters():
                p.requires_grad_(not ("norm" in name or "embed_positions" in name))
            ids = make_batch(model, 2, 32, args.device)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = zotune.METHODS[method](params, lr=0.0, eps=1e-2, num_queries=2, seed=3, virtual=virtual, model=model)
            opt.step(lambda copies=None: loss_of(model, ids, copies))
            grads[virtual] = opt.last_record.projected_grads
        diff = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(grads[False], grads[True]))
        print(f"{method}: in place g = {grads[False]}, virtual g = {grads[True]}, max relative difference {diff:.2e}")


if __name__ == "__main__":
    main()
