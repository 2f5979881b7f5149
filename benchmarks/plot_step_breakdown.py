"""Stacked bars of where a training step's time goes, from ``profile_training.py --breakdown`` files.

    python benchmarks/plot_step_breakdown.py out/mezo.json out/lozo.json --out docs/step_breakdown.png

Each file is one variant (a bar), or a list of variants: device time in the perturbation kernels,
in the other kernels (the forwards and the loss), and the wall time the device was idle (the host
launching and waiting), as ``profile_training.py`` splits a step; or, from ``mezo_step.py``'s side
by side timings, the step's two forwards timed alone and the rest of the step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PARTS = [("other_device_ms", "forwards and loss (device)"), ("perturbation_ms", "perturbation (device)"),
         ("idle_ms", "device idle: host"),
         ("forwards_ms", "two forwards (timed alone)"), ("rest_ms", "rest: perturbation, update, host")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--labels", help="comma-separated names for the bars (default: each file's variant)")
    args = parser.parse_args()
    rows = []
    for f in args.files:
        found = json.loads(f.read_text())
        rows += found if isinstance(found, list) else [found]
    labels = args.labels.split(",") if args.labels else [r["variant"] for r in rows]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 3, 4), dpi=110)
    bottom = [0.0] * len(rows)
    for key, name in PARTS:
        if not any(key in r for r in rows):
            continue
        values = [r.get(key, 0.0) for r in rows]
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, row in enumerate(rows):
        ax.text(x, row["wall_ms"], f"{row['wall_ms']:.1f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
