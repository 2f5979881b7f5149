"""Speed and memory of one MeZO step, measured side by side in one run.

Speed (same process, same model, same batch, variants interleaved, median of repeats):
  * zotune       -- ``zotune.mezo`` (in place: +ε, −2ε, then restore fused with the update; on CUDA
                    the directions come from the fused Philox kernel)
  * zotune, torch generator -- the same step drawing with torch.Generator chunks (CUDA only: the
                    path before the fused kernel)
  * zotune, captured forwards -- the step with its forwards replayed from CUDA graphs, as
                    ``zotune train`` runs them on CUDA (CapturedCausalLM)
  * reference    -- MeZO's published algorithm: four passes (perturb +ε, perturb −2ε,
                    perturb +ε to restore, update), each reseeding the global RNG and drawing
                    a full-size z per parameter (Malladi et al. 2023, Alg. 1)
  * mezo (PyPI)  -- ``mezo.update`` from the ``mezo`` package, when it is installed
  * forward only (x2) -- the two forwards alone, eager and (CUDA) captured: the floor of a step
Memory (one fresh subprocess per mode; peak resident memory after the model is built, or
peak CUDA allocation on a GPU):
  * inference    -- two no-grad forwards
  * zotune       -- one zotune MeZO step
  * adam         -- one backprop step of torch.optim.AdamW (its state allocated)

Usage:
  python benchmarks/mezo_step.py                 # SmolLM2-135M shape, batch 4 x 64, CPU
  python benchmarks/mezo_step.py --device cuda --batch 16 --shape opt-1.3b
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, build_model, loss_of, make_batch, peak_read, peak_reset, timed  # noqa: E402

# ------------------------------------------------------------------ the reference algorithm
def reference_mezo_step(model, ids, lr: float, eps: float, seed: int) -> float:
    """MeZO Alg. 1 as published: global-RNG reseeding, full-size z, four passes."""
    params = [p for p in model.parameters() if p.requires_grad]

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=scale * eps)

    with torch.no_grad():
        perturb(1)
        loss_plus = float(loss_of(model, ids))
        perturb(-2)
        loss_minus = float(loss_of(model, ids))
        perturb(1)
        g = (loss_plus - loss_minus) / (2 * eps)
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=-lr * g)
    return loss_plus


def captured_loss(model, ids):
    """``loss_of`` with the forward replayed from a CUDA graph (CapturedCausalLM, as training runs it)."""
    import torch.nn.functional as F

    from zotune.models.captured import CapturedCausalLM

    captured = CapturedCausalLM(model, bucket=ids.shape[1])
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    def loss():
        logits = captured(input_ids=ids, attention_mask=mask, position_ids=positions,
                          logits_to_keep=ids.shape[1]).logits[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2).float(), ids[:, 1:])

    return loss


def speed(args) -> dict[str, float]:
    import zotune
    from zotune.optim.perturbations import Gaussian

    dtype = getattr(torch, args.dtype)
    model = build_model(args.shape, args.device, dtype)
    ids = make_batch(model, args.batch, args.tokens, args.device)
    lr, eps = 1e-7, 1e-3
    optimizer = zotune.mezo(model.parameters(), lr=lr, eps=eps, seed=0)
    variants = {"zotune": lambda: optimizer.step(lambda: loss_of(model, ids))}
    if args.device.startswith("cuda"):
        torch_generator = zotune.ZOOptimizer(model.parameters(), lr=lr, perturbation=Gaussian(generator="torch"),
                                             estimator=zotune.optim.SPSA(eps=eps), seed=0)
        variants["zotune, torch generator"] = lambda: torch_generator.step(lambda: loss_of(model, ids))
        graphed = captured_loss(model, ids)
        variants["zotune, captured forwards"] = lambda: optimizer.step(graphed)
    variants["reference (4-pass)"] = lambda: reference_mezo_step(model, ids, lr, eps, seed=1)
    try:
        import mezo

        variants["mezo (PyPI)"] = lambda: mezo.update(model, ids, loss_of, eps, lr, 2)
    except ImportError:
        print("mezo package not installed (pip install --no-deps mezo): skipping it", file=sys.stderr)
    variants["forward only (x2)"] = lambda: [float(loss_of(model, ids)) for _ in range(2)]
    if args.device.startswith("cuda"):
        variants["forward only (x2, captured)"] = lambda: [float(graphed()) for _ in range(2)]
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for name, fn in variants.items():  # warm-up
            fn()
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits all alike
            for name, fn in variants.items():
                times[name].append(timed(fn, args.device))
    return {name: statistics.median(values) for name, values in times.items()}


# ------------------------------------------------------------------ memory, one mode per process
def memory_mode(args) -> float:
    import zotune

    dtype = getattr(torch, args.dtype)
    model = build_model(args.shape, args.device, dtype)
    ids = make_batch(model, args.batch, args.tokens, args.device)
    if args.memory_mode == "inference":
        def run():
            with torch.no_grad():
                for _ in range(2):
                    float(loss_of(model, ids))
    elif args.memory_mode == "zotune":
        optimizer = zotune.mezo(model.parameters(), lr=1e-7, eps=1e-3)

        def run():
            optimizer.step(lambda: loss_of(model, ids))
    elif args.memory_mode == "adam":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def run():
            optimizer.zero_grad()
            loss_of(model, ids).backward()
            optimizer.step()
    else:
        raise ValueError(args.memory_mode)
    peak_reset(args.device)
    run()
    return peak_read(args.device)


def memory(args) -> dict[str, float]:
    out = {}
    for mode in ("inference", "zotune", "adam"):
        cmd = [sys.executable, __file__, "--memory-mode", mode, "--shape", args.shape, "--batch", str(args.batch),
               "--tokens", str(args.tokens), "--device", args.device, "--dtype", args.dtype]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[mode] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


def write_breakdown(path: Path, times: dict[str, float], shape: str) -> None:
    """The step variants as forwards + rest (ms): the rest is what the step adds to its forwards."""
    pairs = {"reference (4-pass)": ("reference", "forward only (x2)"),
             "zotune": ("zotune", "forward only (x2)"),
             "zotune, captured forwards": ("zotune captured", "forward only (x2, captured)")}
    rows = [{"variant": f"{shape}\n{label}", "wall_ms": 1000 * times[name], "forwards_ms": 1000 * times[fwd],
             "rest_ms": 1000 * max(times[name] - times[fwd], 0.0)}
            for name, (label, fwd) in pairs.items() if name in times and fwd in times]
    path.write_text(json.dumps(rows, indent=1))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--breakdown", type=Path, help="write each step variant split into its two forwards "
                        "(timed alone, in the same mode) and the rest, for plot_step_breakdown.py")
    parser.add_argument("--memory-mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_mode:
        print(json.dumps({"peak_mib": memory_mode(args)}))
        return

    where = f"{args.shape} shape, batch {args.batch} x {args.tokens} tokens, {args.dtype}, {args.device}"
    if args.device == "cpu":
        where += f", {torch.get_num_threads()} threads"
    times = speed(args)
    reference = times["reference (4-pass)"]
    print(f"\nMeZO step time ({where}; median of {args.repeats}, interleaved)")
    forwards = times["forward only (x2)"]
    print("| variant | seconds / step | vs reference | vs two forwards |\n|---|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.4f} | {seconds / reference:.2f}x | {seconds / forwards:.2f}x |")
    if "zotune, captured forwards" in times:
        ratio = times["zotune, captured forwards"] / times["forward only (x2, captured)"]
        print(f"\ncaptured step / its two captured forwards: {ratio:.2f}x")
    if args.breakdown:
        write_breakdown(args.breakdown, times, args.shape)
    if args.no_memory:
        return
    peaks = memory(args)
    print(f"\nPeak memory of one step ({'CUDA allocated' if args.device.startswith('cuda') else 'resident'}, MiB)")
    print("| mode | peak MiB | vs inference |\n|---|---|---|")
    for name, mib in peaks.items():
        print(f"| {name} | {mib:.0f} | {mib / peaks['inference']:.2f}x |")


if __name__ == "__main__":
    main()
