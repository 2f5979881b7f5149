"""Tensor-train adapters: TTLinear's fast forward against dense reconstruction, and AdaZeta's step.

Part 1, for each hidden size H in --sizes, the two TT maps of an adapter (H -> 64 and 64 -> H,
TT rank 5) on a batch of 16 x 128 tokens (--tokens changes the 128), forward only (what a ZO
step runs):
  * zotune: ``TTLinear`` (x A) B, never building W;
  * reconstruct: W contracted from all cores in order (G_1 x G_2 x ... x G_d, as the reference
    code does on every forward), then x W + b in one fused F.linear;
  * A·B dense: W = A B from the two merged halves (a cheaper reconstruction than the reference's),
    then the same F.linear: the strongest dense baseline;
  * loretta: the ``loretta`` package's ``TensorizedLinear_module`` with the same modes and rank
    (``pip install --no-deps loretta``), where it is installed.
The last column is the floor of any map that returns a new output: allocating and writing it.
Part 2: the whole adapter (both maps, ReLU, residual sum), zotune's fused up-projection against
the reference's reconstruct-then-multiply; and the function-preserving form (the default: a frozen
initial copy subtracted), one GEMM against h + adapter(h) − initial(h) as three tensors.
Part 3: one ZO step at the SmolLM2-135M shape (batch 4 x 64 unless --step-batch / --step-tokens
say otherwise): AdaZeta over LoRETTA_adp adapters (q = 1 and q = 4) against full-parameter MeZO.

    python benchmarks/tt_adapters.py [--device cuda]

On a CPU, outputs of 32 MiB and more (16 x 128 x 4096 float32 and wider) may come from memory
glibc maps afresh on each call, page faults included, or from its heap: which one depends on
the allocation history, so a side's time can change by 10 ms between runs. For stable numbers
let glibc keep freed memory in the heap (both sides alike):

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 python benchmarks/tt_adapters.py
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.nn.functional as F

from common import build_model, loss_of, make_batch, median_time

import zotune
from zotune.adapters import LorettaAdpConfig, TTLinear, inject, trainable_numel
from zotune.adapters.layers import TTAdapter


def package_layer(layer: TTLinear, device: str):
    """The loretta package's TT layer with the same modes and rank, or None when it is not installed."""
    try:
        from loretta.tensor_layers.layers import TensorizedLinear_module
        from loretta.utils.tensor_util import config_class
    except ImportError:
        return None
    config = config_class(shape=layer.in_modes + layer.out_modes, ranks=layer.rank, set_scale_factors=False)
    return TensorizedLinear_module(layer.in_features, layer.out_features, config).to(device)


def reconstruct(layer: TTLinear) -> torch.Tensor:
    """W (N_in x N_out) by contracting the cores left to right, as the reference implementation does."""
    out = layer.cores[0]
    for core in layer.cores[1:]:
        out = torch.tensordot(out, core, dims=([-1], [0]))
    return out.reshape(layer.in_features, layer.out_features)


@torch.no_grad()
def forward_table(sizes: list[int], device: str, repeats: int, tokens: int) -> None:
    print(f"TT forward, batch 16 x {tokens} tokens, TT rank 5, float32, median of", repeats)
    if device == "cpu" and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        print("(glibc may map outputs of 32 MiB and more afresh on each call: see this script's docstring)")
    print("| map | modes | zotune ms | reconstruct ms | A·B dense ms | loretta ms | reconstruct / zotune | "
          "A·B dense / zotune | loretta / zotune | fresh output ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        for n_in, n_out in ((size, 64), (64, size)):
            layer = TTLinear(n_in, n_out, 5, generator=g).to(device)
            x = torch.randn(16, tokens, n_in, generator=g).to(device)
            fast = median_time(lambda: layer(x), device, repeats)
            full = median_time(lambda: F.linear(x, reconstruct(layer).T, layer.bias), device, repeats)
            dense = median_time(lambda: F.linear(x, layer.to_dense().T, layer.bias), device, repeats)
            theirs = package_layer(layer, device)
            other = median_time(lambda: theirs(x), device, repeats) if theirs is not None else float("nan")
            # The floor of any map that returns a new output: allocating and writing it once.
            floor = median_time(lambda: torch.zeros(16, tokens, n_out, device=device), device, repeats)
            modes = f"{layer.in_modes} {layer.out_modes}"
            print(f"| {n_in}x{n_out} | {modes} | {1e3 * fast:.3f} | {1e3 * full:.3f} | {1e3 * dense:.3f} | "
                  f"{1e3 * other:.3f} | {full / fast:.2f}x | {dense / fast:.2f}x | {other / fast:.2f}x | "
                  f"{1e3 * floor:.3f} |")


@torch.no_grad()
def adapter_table(sizes: list[int], device: str, repeats: int, tokens: int) -> None:
    """The whole adapter h + s·up(relu(down(h))) as LoRETTA_adp runs it, against the reference's way."""
    print(f"\nTT adapter h + up(relu(down(h))), bottleneck 64, TT rank 5, batch 16 x {tokens} tokens, float32, "
          f"median of {repeats}")
    print("| hidden | zotune ms | reconstruct ms | reconstruct / zotune | function-preserving ms | "
          "unfused function-preserving ms | unfused / fused |\n|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        adapter = TTAdapter(size, 64, 5, "relu", 1.0, 16, g).to(device)
        initial = copy.deepcopy(adapter).requires_grad_(False)  # the frozen copy a function-preserving one subtracts
        h = torch.randn(16, tokens, size, generator=g).to(device)

        def rebuilt():
            down, up = adapter.down, adapter.up
            hidden = F.relu(F.linear(h, reconstruct(down).T, down.bias))
            return h + adapter.scale * F.linear(hidden, reconstruct(up).T, up.bias)

        fast = median_time(lambda: adapter.add_to(h), device, repeats)
        full = median_time(rebuilt, device, repeats)
        # LoRETTA_adp's default: h + adapter(h) − initial(h) in one GEMM, against the three-tensor sum
        preserving = median_time(lambda: adapter.add_to(h, initial), device, repeats)
        unfused = median_time(lambda: h + (adapter(h) - initial(h)), device, repeats)
        print(f"| {size} | {1e3 * fast:.3f} | {1e3 * full:.3f} | {full / fast:.2f}x | {1e3 * preserving:.3f} | "
              f"{1e3 * unfused:.3f} | {unfused / preserving:.2f}x |")


def step_table(device: str, repeats: int, batch: int, tokens: int) -> None:
    print(f"\nZO step, SmolLM2-135M shape, batch {batch} x {tokens} tokens, float32, median of", repeats)
    results = {}
    for name in ("mezo (all parameters)", "adazeta q=1", "adazeta q=4"):
        model = build_model("smollm2-135m", device, torch.float32)
        ids = make_batch(model, batch, tokens, device)
        if name.startswith("mezo"):
            opt = zotune.mezo(model.parameters(), lr=1e-7)
            count = sum(p.numel() for p in model.parameters())
        else:
            inject(model, LorettaAdpConfig(train_norms=False))
            count = trainable_numel(model)
            opt = zotune.adazeta([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                 num_queries=int(name[-1]))
        results[name] = (median_time(lambda: opt.step(lambda: loss_of(model, ids)), device, repeats), count)
    base = results["mezo (all parameters)"][0]
    print("| method | trainable | step s | vs MeZO |")
    print("|---|---|---|---|")
    for name, (seconds, count) in results.items():
        print(f"| {name} | {count:,} | {seconds:.3f} | {seconds / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="576,1536,2048,3072,4096,5120")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence in parts 1 and 2 (16 sequences)")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--step-batch", type=int, default=4, help="sequences per ZO step in part 3")
    parser.add_argument("--step-tokens", type=int, default=64, help="tokens per sequence in part 3")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    forward_table(sizes, args.device, args.repeats, args.tokens)
    adapter_table(sizes, args.device, args.repeats, args.tokens)
    if not args.skip_step:
        step_table(args.device, max(3, args.repeats // 2), args.step_batch, args.step_tokens)


if __name__ == "__main__":
    main()
