"""The accuracy sweep: a grid of method x learning rate x task x seed from one YAML, run as
``zotune train`` processes, several at once; finished cells are kept in a CSV, so a half-done
grid continues where it stopped (in a later session too).

    python benchmarks/accuracy.py benchmarks/accuracy.yaml --stage lr --parallel 8
    python benchmarks/accuracy.py benchmarks/accuracy.yaml --stage tasks --parallel 8
    python benchmarks/accuracy.py benchmarks/accuracy.yaml --report          # table and plot only

The YAML names ``base`` overrides (every run), ``rows`` (a method and its trainable set, as
overrides), ``stages`` (``lr``: each row's learning rates on the tuning task, as factors of the
method's default lr for its trainable kind; later stages: tasks and seeds at the row's best lr, the
one with the best dev metric in the ``lr`` stage, or multiples of it: ``best_lr_factors``), and
``baselines`` (``zotune eval`` settings:
zero-shot, in-context). A cell's run folder is ``runs_dir/<row>-<task>-lr<lr>-s<seed>``; one that
is unfinished is resumed. ``--report`` rewrites the table between the markers of ``results_md`` and
draws the dev curves of each row's best lr on the tuning task.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

FIELDS = ["row", "stage", "task", "lr", "seed", "steps", "best_dev", "test", "zero_shot", "max_loss_ratio",
          "median_step_s", "skipped", "run_dir", "dev_curve"]
BEGIN, END = "<!-- results table: begin (benchmarks/accuracy.py --report) -->", "<!-- results table: end -->"


def load_grid(path: Path) -> dict:
    grid = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in ("base", "rows", "stages", "runs_dir", "results_csv"):
        if key not in grid:
            raise SystemExit(f"{path}: no '{key}' section")
    return grid


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        # one row per cell: a cell run again (e.g. resumed after a collected copy) keeps its last result
        key = lambda r: (r["row"], r["stage"], r["task"], float(r["lr"]), int(r["seed"]))  # noqa: E731
        writer.writerows(sorted({key(r): r for r in rows}.values(), key=key))
    tmp.replace(path)


def default_lr(overrides: dict) -> float:
    """The method's default lr for the row's trainable kind, as a run would resolve it."""
    from zotune.optim import METHODS
    from zotune.train.setup import selection_kind

    kind = selection_kind(overrides.get("optim.trainable"), overrides.get("adapter.kind", "none"))
    if kind is None:
        raise SystemExit(f"{overrides}: a regex selection has no default lr here; give the row optim.lr factors "
                         "of an explicit trainable kind")
    return METHODS[overrides["optim.method"]].default_lr[kind]


def rounded_lr(lr: float) -> float:
    """An lr as cells, run folders and the CSV name it: three significant digits (10 x 3e-5 is 3e-4)."""
    return float(f"{lr:.3g}")


def cells(grid: dict, stage: str, done: list[dict]) -> list[dict]:
    """The cells of ``stage``: (row, task, lr, seed) with their overrides."""
    spec = grid["stages"][stage]
    lrs = {}
    for row, overrides in grid["rows"].items():
        if "rows" in spec and row not in spec["rows"]:
            continue
        if stage == "lr":
            lrs[row] = [default_lr(overrides) * factor for factor in spec["lr_factors"]]
            lrs[row] += spec.get("extra_lrs", {}).get(row, [])  # beyond the factors, where the best was an end
        else:
            best = best_lr(done, row, grid["stages"]["lr"]["tasks"][0])
            if best is None:
                print(f"{row}: no finished lr-stage cell yet; skipped in stage {stage}")
                continue
            lrs[row] = [best * factor for factor in spec.get("best_lr_factors", [1])]
    # Task by task, then seed by seed: a sweep stopped part-way has every row on the first tasks.
    # An extra lr may equal a factor's (10x a default that moved): each lr once, or two processes would
    # share one run folder.
    lrs = {row: list(dict.fromkeys(map(rounded_lr, values))) for row, values in lrs.items()}
    return [{"row": row, "stage": stage, "task": task, "lr": lr, "seed": seed,
             "own_folder": "overrides" in spec,
             "overrides": {**grid["base"], **grid["rows"][row], **spec.get("overrides", {})}}
            for task in spec["tasks"] for seed in spec["seeds"] for row in lrs for lr in lrs[row]]


def _at_stage_lr(grid: dict, result: dict, best: float | None) -> bool:
    """Whether a result ran at an lr its stage takes from the row's best (the best, or the stage's multiples)."""
    if best is None:
        return False
    factors = grid["stages"].get(result["stage"], {}).get("best_lr_factors", [1])
    return float(result["lr"]) in {rounded_lr(best * factor) for factor in factors} | {best}


def best_lr(done: list[dict], row: str, task: str) -> float | None:
    candidates = [r for r in done if r["row"] == row and r["stage"] == "lr" and r["task"] == task and r["best_dev"]]
    if not candidates:
        return None
    return float(max(candidates, key=lambda r: float(r["best_dev"]))["lr"])


def run_name(cell: dict) -> str:
    # A stage with its own overrides (e.g. more steps) gets its own folders; the others share them, so
    # the tasks stage's cell on the tuning task is the lr stage's run.
    suffix = f"-{cell['stage']}" if cell.get("own_folder") else ""
    return f"{cell['row']}-{cell['task']}-lr{cell['lr']:g}-s{cell['seed']}{suffix}"


def command(cell: dict, runs_dir: Path) -> list[str]:
    flags = {**cell["overrides"], "data.task": cell["task"], "optim.lr": cell["lr"], "train.seed": cell["seed"],
             "train.output_dir": str(runs_dir), "train.run_name": run_name(cell)}
    folder = runs_dir / run_name(cell)
    if (folder / "checkpoints").is_dir():
        flags["train.resume"] = "true"  # an unfinished cell continues from its last checkpoint
    elif folder.is_dir():
        shutil.rmtree(folder)  # killed before its first checkpoint: start it again
    argv = [sys.executable, "-m", "zotune", "train"]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


def summarise(cell: dict, run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    seconds = [r["seconds"] for r in rows if "seconds" in r]
    metric = next(k for k in ("accuracy", "f1") if k in results)
    finite = [loss for loss in losses if math.isfinite(loss)]
    return {"row": cell["row"], "stage": cell["stage"], "task": cell["task"], "lr": cell["lr"], "seed": cell["seed"],
            "steps": results["steps"], "best_dev": results.get(f"best_dev_{metric}", ""),
            "test": results[metric], "zero_shot": results.get(f"zero_shot_{metric}", ""),
            "max_loss_ratio": round(max(finite) / finite[0], 3) if finite else "",
            "median_step_s": round(statistics.median(seconds), 4) if seconds else "",
            "skipped": results.get("skipped_steps", 0), "run_dir": str(run_dir),
            # "step:metric ...": the plot draws from the CSV, wherever the run folders are
            "dev_curve": " ".join(f"{r['step']}:{r[f'dev_{metric}']:.4f}" for r in rows if f"dev_{metric}" in r)}


def run_stage(grid: dict, stage: str, parallel: int, dry_run: bool, stop_after: float | None = None,
              gpus: int = 1, deadline: float | None = None) -> None:
    """Run the stage's missing cells, ``parallel`` at once (spread over ``gpus`` GPUs, the least busy
    first); no new cell starts ``stop_after`` seconds in. With ``deadline`` (seconds) the sweep ends by
    then: a cell starts only if the longest cell of its task finished so far in this call would end in
    time, and cells still running at the deadline are stopped (SIGTERM: a run then writes a checkpoint,
    which a later call resumes)."""
    runs_dir, results_csv = Path(grid["runs_dir"]), Path(grid["results_csv"])
    done = read_rows(results_csv)
    own = {name for name, spec in grid["stages"].items() if "overrides" in spec}
    # A cell is finished when its run is: the tasks stage's cell on the tuning task is the lr stage's run.
    finished = {(r["row"], r["stage"] if r["stage"] in own else "", r["task"], float(r["lr"]), int(r["seed"]))
                for r in done}
    todo = [c for name in stage.split(",") for c in cells(grid, name, done)  # "long,tasks": in that order
            if (c["row"], c["stage"] if c["own_folder"] else "", c["task"], c["lr"], c["seed"]) not in finished]
    collected = [c for c in todo if (runs_dir / run_name(c) / "results.json").exists()]
    if collected:  # finished runs whose rows a stopped sweep did not write
        write_rows(results_csv, done + [summarise(c, runs_dir / run_name(c)) for c in collected])
        todo = [c for c in todo if c not in collected]
        print(f"collected {len(collected)} finished runs from {runs_dir}")
    print(f"stage {stage}: {len(todo)} cells to run ({len(finished) + len(collected)} cells done in all)")
    if dry_run:
        for cell in todo:
            print(" ".join(command(cell, runs_dir)))
        return
    runs_dir.mkdir(parents=True, exist_ok=True)
    running: list[tuple[dict, subprocess.Popen, float, int]] = []
    longest: dict[str, float] = {}  # task -> the longest wall time of its cells finished in this call
    began = time.time()
    while todo or running:
        if stop_after is not None and time.time() - began > stop_after and todo:
            print(f"{len(todo)} cells left for a later call (--stop-after {stop_after:g} s)")
            todo = []
        if deadline is not None:
            left = deadline - (time.time() - began)
            # a task with no finished cell yet is judged by the longest of any task
            fits = [c for c in todo if longest.get(c["task"], max(longest.values(), default=0.0)) <= left]
            if len(fits) < len(todo):
                print(f"{len(todo) - len(fits)} cells left for a later call: they would not end by the deadline")
                todo = fits
            if left <= 0:
                for cell, proc, _, _ in running:
                    proc.terminate()
                    proc.wait()
                    print(f"stopped {run_name(cell)} at the deadline ({deadline:g} s); a later call continues it "
                          "(from the checkpoint it writes when stopped, if it had begun training)")
                return
        while todo and len(running) < parallel:
            cell = todo.pop(0)
            log = open(runs_dir / f"{run_name(cell)}.out", "a", encoding="utf-8")
            gpu = min(range(gpus), key=lambda g: sum(item[3] == g for item in running))
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)} if gpus > 1 else None
            running.append((cell, subprocess.Popen(command(cell, runs_dir), stdout=log, stderr=subprocess.STDOUT,
                                                   env=env), time.time(), gpu))
        time.sleep(0.25)  # cells of a few seconds (a small model's) are picked up without a lag
        for item in list(running):
            cell, proc, start, _ = item
            if proc.poll() is None:
                continue
            running.remove(item)
            run_dir = runs_dir / run_name(cell)
            if proc.returncode == 0 and (run_dir / "results.json").exists():
                longest[cell["task"]] = max(longest.get(cell["task"], 0.0), time.time() - start)
                done = read_rows(results_csv) + [summarise(cell, run_dir)]
                write_rows(results_csv, done)  # after every cell: an interrupted sweep keeps what finished
                print(f"done {run_name(cell)} in {time.time() - start:.0f} s: test {done[-1]['test']:.3f}")
            else:
                print(f"FAILED {run_name(cell)} (exit {proc.returncode}); see {runs_dir / run_name(cell)}.out")


def run_baselines(grid: dict) -> None:
    """``zotune eval`` settings (zero-shot, in-context), recorded as rows of stage 'baseline'."""
    results_csv = Path(grid["results_csv"])
    done = read_rows(results_csv)
    for name, spec in grid.get("baselines", {}).items():
        for task in spec["tasks"]:
            if any(r["row"] == name and r["task"] == task for r in done):
                continue
            flags = {**{k: v for k, v in grid["base"].items() if k.startswith(("model.", "data."))},
                     **spec.get("overrides", {}), "data.task": task, "train.progress": "false"}
            argv = [sys.executable, "-m", "zotune", "eval"] + [a for k, v in flags.items() for a in (f"--{k}", str(v))]
            out = subprocess.run(argv, capture_output=True, text=True)
            found = re.findall(r": (\d+\.\d)%", out.stdout)
            if out.returncode or not found:
                print(f"FAILED baseline {name} {task}: {out.stderr[-500:]}")
                continue
            done.append({"row": name, "stage": "baseline", "task": task, "lr": 0, "seed": 0, "steps": 0,
                         "best_dev": "", "test": float(found[-1]) / 100, "zero_shot": "", "max_loss_ratio": "",
                         "median_step_s": "", "skipped": 0, "run_dir": ""})
            write_rows(results_csv, done)
            print(f"done baseline {name} {task}: {found[-1]}%")


def report(grid: dict) -> None:
    """The Markdown table (rows x tasks, mean ± std over seeds at the best lr) and the dev-curve plot."""
    done = read_rows(Path(grid["results_csv"]))
    tuning = grid["stages"]["lr"]["tasks"][0]
    # Stages with their own overrides (e.g. 5,000 steps) get columns of their own: (stage, task).
    own = [name for name, spec in grid["stages"].items() if "overrides" in spec]
    tasks = list(dict.fromkeys([tuning] + [t for n, s in grid["stages"].items() if n not in own for t in s["tasks"]]))
    columns = [("", t) for t in tasks] + [(n, t) for n in own for t in grid["stages"][n]["tasks"]]
    headers = [t if not n else f"{t} ({n})" for n, t in columns]
    lines = ["| row | lr (chosen on " + tuning + " dev) | " + " | ".join(headers) + " | max loss / first |",
             "|---|---|" + "---|" * len(columns) + "---|"]
    for row in list(grid.get("baselines", {})) + list(grid["rows"]):
        best = best_lr(done, row, tuning)
        mine = [r for r in done if r["row"] == row and (r["stage"] == "baseline" or _at_stage_lr(grid, r, best))]
        if not mine:
            continue
        cells_ = []
        for stage, task in columns:
            # one score per run: the tasks stage's cell on the tuning task is the lr stage's run
            runs = list({r["run_dir"] or id(r): r for r in mine if r["task"] == task
                         and (r["stage"] == stage if stage else r["stage"] not in own)}.values())
            # a stage at several multiples of the best lr shows the multiple with the best dev (the test
            # score is not looked at to choose), and says which it was where it is not the best lr itself
            by_lr: dict[float, list] = {}
            for r in runs:
                by_lr.setdefault(float(r["lr"]), []).append(r)
            note, scores = "", []
            if by_lr:
                chosen = max(by_lr, key=lambda lr: statistics.mean(float(r["best_dev"] or 0) for r in by_lr[lr]))
                scores = [100 * float(r["test"]) for r in by_lr[chosen]]
                note = f" (lr {chosen:g})" if best is not None and chosen != best else ""
            if not scores:
                cells_.append("")
            elif len(scores) == 1:
                cells_.append(f"{scores[0]:.1f}{note}")
            else:
                cells_.append(f"{statistics.mean(scores):.1f} ± {statistics.stdev(scores):.1f} ({len(scores)}){note}")
        # (at the chosen lr: the multiples a stage tries beyond it are no default)
        ratios = [float(r["max_loss_ratio"]) for r in mine if r["max_loss_ratio"] and
                  (r["stage"] == "baseline" or float(r["lr"]) == best)]
        tried = sorted({float(r["lr"]) for r in done if r["row"] == row and r["stage"] == "lr"})
        lr_text = "" if best is None else f"{best:g} of {', '.join(f'{lr:g}' for lr in tried)}"
        lines.append(f"| {row} | {lr_text} | " + " | ".join(cells_) + f" | {max(ratios):.2f} |" if ratios else
                     f"| {row} | {lr_text} | " + " | ".join(cells_) + " |  |")
    table = "\n".join(lines)
    md = Path(grid["results_md"])
    text = md.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{md}: no table markers ({BEGIN} ... {END})")
    md.write_text(text[: text.index(BEGIN) + len(BEGIN)] + "\n" + table + "\n" + text[text.index(END):],
                  encoding="utf-8")
    print(table)
    plot_dev_curves(grid, done, tuning)


def dev_curve(row: dict) -> list[tuple[int, float]]:
    """(step, dev metric in %) of a finished cell: from its CSV row, else from its run folder's log."""
    if row.get("dev_curve"):
        return [(int(step), 100 * float(value)) for step, value in (p.split(":") for p in row["dev_curve"].split())]
    log = Path(row["run_dir"], "log.jsonl")
    if not row["run_dir"] or not log.exists():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return [(r["step"], 100 * r["dev_accuracy"]) for r in records if "dev_accuracy" in r]


def plot_dev_curves(grid: dict, done: list[dict], task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    drawn = 0
    for row in grid["rows"]:
        best = best_lr(done, row, task)
        # a run at the row's best lr with a curve: the lr stage's, else another seed's (same steps)
        found = [r for r in done if r["row"] == row and r["task"] == task and r["stage"] in ("lr", "tasks", "seeds")
                 and best is not None and float(r["lr"]) == best]
        with_curve = [r for r in sorted(found, key=lambda r: r["stage"] != "lr") if dev_curve(r)]
        if with_curve:
            dev, seed = dev_curve(with_curve[0]), with_curve[0]["seed"]
            ax.plot(*zip(*dev), "o-", label=f"{row} (lr {best:g}, seed {seed})", markersize=3)
            drawn += 1
    out = Path(grid["results_md"]).with_name("results_dev_curves.png")
    if not drawn:  # no curve in the CSV and the run folders live where the sweep ran: keep the plot
        plt.close(fig)
        print(f"no run logs under the CSV's run folders here; {out} kept")
        return
    ax.set_xlabel("step")
    ax.set_ylabel(f"{task} dev accuracy (%)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--stage", help="run this stage's missing cells (lr, tasks, seeds, long; several: "
                        "comma-separated, run in that order) or 'baselines'")
    parser.add_argument("--parallel", type=int, default=1, help="training processes at once (they share the GPUs)")
    parser.add_argument("--gpus", type=int, default=1, help="spread the processes over this many GPUs")
    parser.add_argument("--only", help="comma-separated rows to run (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--stop-after", type=float, help="start no new cell after this many seconds")
    parser.add_argument("--deadline", type=float, help="end by this many seconds: start a cell only if it would "
                        "end in time (judged by its task's longest finished cell), stop what still runs then")
    parser.add_argument("--report", action="store_true", help="rewrite the table and the plot from the CSV")
    args = parser.parse_args()
    grid = load_grid(args.grid)
    if args.only:
        grid["rows"] = {k: v for k, v in grid["rows"].items() if k in args.only.split(",")}
    if args.stage == "baselines":
        run_baselines(grid)
    elif args.stage:
        run_stage(grid, args.stage, args.parallel, args.dry_run, args.stop_after, args.gpus, args.deadline)
    if args.report:
        report(load_grid(args.grid))


if __name__ == "__main__":
    main()
