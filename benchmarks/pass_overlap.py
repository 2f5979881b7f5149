"""Whether a step's perturbation passes can hide behind its forwards on one GPU, and the floor they set.

    python benchmarks/pass_overlap.py --shape llama-2-7b --dtype bfloat16
    python benchmarks/pass_overlap.py --shape opt-1.3b --dtype float16

A MeZO step runs two forwards and three in-place passes over the weights (+εz, −2εz, restore+update).
A pass could in principle run beside a forward on a second stream, each layer's pass once the forward
has read that layer. This measures the most such overlap could give: whole passes on a second stream
(low priority, so the forward's kernels are scheduled first) started with the forwards, no ordering
between them, against the same work in one stream. Also printed: the floors a step's passes put on
the ratio "step / its two forwards" (the target's measure): three one-term passes, and the two passes
of a step whose restore+update would be folded into the next step's +εz (a two-term pass).

Forwards are replayed from CUDA graphs as training runs them (CapturedCausalLM), batch 16 x 64;
times are medians of CUDA-event spans, each started after a device-side sleep so that the host's
launches are all queued before the timed work starts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, build_model, make_batch  # noqa: E402
from mezo_step import captured_loss  # noqa: E402

from zotune.optim.fused import FusedPerturber  # noqa: E402


def span_ms(body, stream: torch.cuda.Stream, repeats: int) -> float:
    spans = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(5_000_000)  # keeps the device busy while the host queues the work below
            start.record()
            body()
            end.record()
        torch.cuda.synchronize()
        spans.append(start.elapsed_time(end))
    return statistics.median(spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("pass_overlap.py measures CUDA streams: it needs a CUDA device")

    model = build_model(args.shape, "cuda", getattr(torch, args.dtype))
    loss = captured_loss(model, make_batch(model, args.batch, args.tokens, "cuda"))
    perturber = FusedPerturber()
    tables = perturber.tables([(index, p.data) for index, p in enumerate(model.parameters())])
    low, high = torch.cuda.Stream.priority_range()  # numerically: least, greatest
    main_stream, side = torch.cuda.Stream(priority=high), torch.cuda.Stream(priority=low)

    def forwards():
        loss(), loss()

    def passes(terms: int = 1, count: int = 1):
        for _ in range(count):  # tiny step sizes: the weights stay finite over all repeats
            perturber.add_(tables, [(1e-4, 1), (-1e-4, 2)][:terms])

    def beside():
        side.wait_stream(main_stream)
        with torch.cuda.stream(side):
            passes(count=3)
        forwards()
        main_stream.wait_stream(side)

    with torch.no_grad(), torch.cuda.stream(main_stream):
        forwards()  # captures the graph
        rows = {"two forwards": forwards, "one pass": passes, "one two-term pass": lambda: passes(terms=2),
                "two forwards, then three passes (one stream)": lambda: (forwards(), passes(count=3)),
                "two forwards beside three passes (second stream)": beside}
        ms = {name: span_ms(body, main_stream, args.repeats) for name, body in rows.items()}
    print(f"\n{args.shape} shape, {args.dtype}, batch {args.batch} x {args.tokens}, {torch.cuda.get_device_name()}"
          f" (median of {args.repeats})")
    print("| work | ms |\n|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} |")
    two = ms["two forwards"]
    hidden = ms["two forwards, then three passes (one stream)"] - ms["two forwards beside three passes (second stream)"]
    print(f"\nhidden by the second stream: {hidden:.2f} of {3 * ms['one pass']:.2f} ms of passes")
    print(f"floor of step / two forwards, three passes: {(two + 3 * ms['one pass']) / two:.3f}x")
    print(f"floor of step / two forwards, restore+update folded into the next +εz: "
          f"{(two + ms['one pass'] + ms['one two-term pass']) / two:.3f}x")


if __name__ == "__main__":
    main()
