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
    parser.add_argument("--steps", type=int, default=2, help="steps per path (later steps reuse kept factors)")
    args = parser.parse_args()
    paths = {"in place": None, "virtual": None, "virtual, 1 copy per forward": 1}  # path -> copies per forward
    for method in ("lozo", "tezo"):
        grads = {}
        for path, per in paths.items():
            model = build_model(args.shape, args.device, getattr(torch, args.dtype))
            for name, p in model.named_parameters():
                p.requires_grad_(not ("norm" in name or "embed_positions" in name))
            ids = make_batch(model, 2, 32, args.device)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = zotune.METHODS[method](params, lr=0.0, eps=1e-2, num_queries=2, seed=3,
                                         execution=zotune.Virtual(model, per) if path != "in place" else None)
            grads[path] = []
            for _ in range(args.steps):  # lr = 0: the same weights, each step its own directions
                opt.step(lambda copies=None: loss_of(model, ids, copies))
                grads[path] += opt.last_record.projected_grads
        reference = grads.pop("in place")
        print(f"{method}: in place g = {[f'{g:.6g}' for g in reference]}")
        for path, measured in grads.items():
            diff = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(reference, measured))
            print(f"  {path}: max relative difference {diff:.2e}")


if __name__ == "__main__":
    main()
