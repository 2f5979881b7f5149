"""Draws ``docs/step_dataflow.png``: one ZO step's data flow through estimator, perturbation,
execution path and update rule (``python docs/step_diagram.py``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {  # name -> (x, y, width, height, title, lines)
    "optimizer": (0.37, 0.76, 0.27, 0.17, "ZOOptimizer.step(closure)",
                  ["keys: DrawKey(seed, step, i)", "state: step, seed, moments"]),
    "rule": (0.73, 0.76, 0.27, 0.17, "UpdateRule",
             ["SGD | Momentum | Adam", "| SeparableAdam", "θ ← θ − η(direction + λθ)"]),
    "estimator": (0.01, 0.46, 0.27, 0.19, "Estimator (SPSA)",
                  ["points(keys): ±ε per key", "projected_gradients", "-> g_1..g_q"]),
    "execution": (0.37, 0.46, 0.27, 0.19, "ExecutionPath",
                  ["InPlace | DriftSafe | Virtual", "Distributed(inner, layout)", "measure_points -> losses"]),
    "perturbation": (0.73, 0.46, 0.27, 0.19, "Perturbation",
                     ["Gaussian | LowRank", "| TemporalCP", "Z = f(key, param index)"]),
    "trajectory": (0.01, 0.16, 0.27, 0.15, "trajectory log", ["losses and lrs per step", "replay rebuilds θ"]),
    "model": (0.37, 0.16, 0.27, 0.15, "model + closure", ["forward passes only", "a loss per point"]),
}

ARROWS = [  # (from (x, y), to (x, y), label): edges of the boxes above
    ((0.40, 0.76), (0.12, 0.65), "keys"),
    ((0.20, 0.65), (0.48, 0.76), "g_1..g_q"),
    ((0.28, 0.60), (0.37, 0.60), "points"),
    ((0.37, 0.50), (0.28, 0.50), "losses"),
    ((0.64, 0.555), (0.73, 0.555), "offset·Z"),
    ((0.45, 0.46), (0.45, 0.31), "closure(copies)"),
    ((0.56, 0.31), (0.56, 0.46), "losses"),
    ((0.145, 0.46), (0.145, 0.31), "losses, lrs"),
    ((0.64, 0.845), (0.73, 0.845), "g_i, lr"),
    ((0.865, 0.65), (0.865, 0.76), "terms, coordinates"),
]


def draw(out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(11, 6.5))
    ax.set_axis_off()
    ax.set_xlim(-0.01, 1.02)
    ax.set_ylim(0.12, 0.97)
    for x, y, w, h, title, lines in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.01", facecolor="#eef3fb",
                                    edgecolor="#3a5a8c", linewidth=1.4))
        ax.text(x + w / 2, y + h - 0.03, title, ha="center", va="top", fontsize=11, weight="bold")
        for i, line in enumerate(lines):
            ax.text(x + w / 2, y + h - 0.07 - 0.035 * i, line, ha="center", va="top", fontsize=8,
                    family="monospace")
    for (x0, y0), (x1, y1), label in ARROWS:
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=14, color="#b0472f",
                                     linewidth=1.3))
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, label, fontsize=8, color="#b0472f", ha="center", va="center",
                bbox=dict(facecolor="white", edgecolor="none", pad=1.0))
    ax.set_title("One ZO step: Estimator x Perturbation x ExecutionPath x UpdateRule", fontsize=13)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(draw(Path(__file__).with_name("step_dataflow.png")))
