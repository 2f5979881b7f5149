"""A run's curves as a PNG: training loss (raw and smoothed), the dev metric by step, and the test metric
before (zero-shot) and after training."""

from __future__ import annotations

import json
from pathlib import Path


def plot_run(run_dir: Path, results: dict | None = None, out_name: str = "curves.png") -> Path:
    """Draw ``run_dir/log.jsonl`` into ``run_dir/curves.png`` (headless backend); with the run's
    ``results``, the zero-shot and final test metric are marked on the metric's axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    dev_key = next((k for r in records for k in r if k.startswith("dev_")), "dev_accuracy")  # dev_accuracy, dev_f1
    dev = [(r["step"], r[dev_key]) for r in records if dev_key in r]
    dev_name = dev_key.replace("_", " ")
    smoothed, value = [], None
    for loss in losses:  # exponential moving average, as on the progress bar
        value = loss if value is None else 0.95 * value + 0.05 * loss
        smoothed.append(value)

    fig, ax_loss = plt.subplots(figsize=(7, 4), dpi=110)
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss (L(θ+εZ))")
    ax_loss.plot(steps, smoothed, color="tab:blue", linewidth=1.6, label="loss, smoothed")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    handles, labels = ax_loss.get_legend_handles_labels()
    metric = dev_key[len("dev_"):]
    results = results or {}
    marks = [(f"zero-shot test {metric}", results.get(f"zero_shot_{metric}"), 0, "x", "tab:gray"),
             (f"final test {metric}", results.get(metric),  # at the step whose weights were tested
              results.get("best_step", steps[-1] if steps else 0), "*", "tab:red")]
    marks = [mark for mark in marks if isinstance(mark[1], (int, float))]
    if dev or marks:
        ax_dev = ax_loss.twinx()
        if dev:
            ax_dev.plot([s for s, _ in dev], [100 * a for _, a in dev], "o-", color="tab:orange", label=dev_name)
        for label, value, step, marker, color in marks:
            ax_dev.plot([step], [100 * value], marker, color=color, markersize=11, linestyle="none",
                        label=f"{label} {100 * value:.1f}%")
        ax_dev.set_ylabel(f"{metric} (%)")
        more_handles, more_labels = ax_dev.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax_loss.legend(handles, labels, loc="best", fontsize=8)
    ax_loss.set_title(Path(run_dir).name, fontsize=9)
    fig.tight_layout()
    out = Path(run_dir) / out_name
    fig.savefig(out)
    plt.close(fig)
    return out
