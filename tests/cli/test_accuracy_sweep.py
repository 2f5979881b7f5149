"""benchmarks/accuracy.py on a tiny model: runs a stage, keeps finished cells, continues, reports."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

import zotune
from conftest import SHARED_DATA, needs_shared_data

SWEEP = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy.py"

pytestmark = needs_shared_data


def test_a_stage_runs_its_cells_once_and_the_report_fills_the_table(tiny_model_dir, tmp_path):
    grid = {
        "base": {"model.name": str(tiny_model_dir), "data.data_dir": str(SHARED_DATA), "data.n_train": 16,
                 "data.n_dev": 8, "data.n_test": 8, "train.steps": 4, "train.batch_size": 4,
                 "train.progress": "false", "train.zero_shot": "false"},
        "runs_dir": str(tmp_path / "runs"), "results_csv": str(tmp_path / "results.csv"),
        "results_md": str(tmp_path / "results.md"),
        "rows": {"mezo": {"optim.method": "mezo", "optim.trainable": "all"},
                 "lozo": {"optim.method": "lozo", "optim.trainable": "all"}},
        # the lr stage: every row at its default lr, mezo also at 10x (an extra lr), and at the default once
        # more (an extra lr equal to a factor's: one cell, not two runs in one folder); seeds: mezo's row only
        "stages": {"lr": {"tasks": ["sst2"], "seeds": [0], "lr_factors": [1],
                          "extra_lrs": {"mezo": [zotune.METHODS["mezo"].default_lr["all"] * f for f in (10, 1)]}},
                   "seeds": {"tasks": ["sst2"], "seeds": [1], "rows": ["mezo"]},
                   "tasks": {"tasks": ["sst2"], "seeds": [0]},
                   "long": {"tasks": ["sst2"], "seeds": [0], "rows": ["mezo"], "best_lr_factors": [1, 3],
                            "overrides": {"train.steps": 6}}},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    (tmp_path / "results.md").write_text("# r\n<!-- results table: begin (benchmarks/accuracy.py --report) -->\n"
                                         "<!-- results table: end -->\n")

    def sweep(*args):
        done = subprocess.run([sys.executable, str(SWEEP), str(path), *args], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert "stage lr: 3 cells to run" in sweep("--stage", "lr", "--parallel", "2")
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    default = zotune.METHODS["mezo"].default_lr["all"]  # lozo's too
    assert sorted((r["row"], float(r["lr"])) for r in rows) == sorted(
        [("lozo", float(f"{default:.3g}"))] + [("mezo", float(f"{default * factor:.3g}")) for factor in (1, 10)])
    assert all(0 <= float(r["test"]) <= 1 and r["best_dev"] for r in rows)
    assert "stage lr: 0 cells to run (3 cells done in all)" in sweep("--stage", "lr")  # a finished grid continues
    assert "stage seeds: 1 cells to run" in sweep("--stage", "seeds", "--report", "--parallel", "2")  # the best lr
    table = (tmp_path / "results.md").read_text()
    assert "| mezo |" in table and "| lozo |" in table and (tmp_path / "results_dev_curves.png").exists()
    # Two stages in one call, in order: the tasks stage's cells on the tuning task are the lr stage's runs
    # (finished already, not run again, even where the run folders are gone); the long stage has folders
    # of its own and a column of its own.
    for folder in (tmp_path / "runs").iterdir():
        if folder.is_dir():
            shutil.rmtree(folder)
    out = sweep("--stage", "tasks,long", "--report", "--parallel", "2")
    assert "stage tasks,long: 2 cells to run (4 cells done in all)" in out
    long_rows = [r for r in csv.DictReader(open(tmp_path / "results.csv")) if r["stage"] == "long"]
    best = next(float(r["lr"]) for r in rows if r["row"] == "mezo" and r["stage"] == "lr"
                and r["best_dev"] == max(x["best_dev"] for x in rows if x["row"] == "mezo"))
    assert sorted(float(r["lr"]) for r in long_rows) == [best, float(f"{3 * best:.3g}")]  # the row's best lr, and 3x
    assert all(r["steps"] == "6" and r["run_dir"].endswith("-long") for r in long_rows)
    table = (tmp_path / "results.md").read_text()
    assert "| sst2 (long) |" in table.splitlines()[2]
    mezo = next(line for line in table.splitlines() if line.startswith("| mezo |")).split(" | ")
    assert mezo[2].endswith("(2)")  # sst2: seeds 0 and 1, the tasks stage's copy of seed 0 counted once
    # the long column: the multiple with the better dev, named when it is not the best lr itself
    chosen = max(long_rows, key=lambda r: float(r["best_dev"]))  # (ties: the first, as the report's max)
    expected = f"{100 * float(chosen['test']):.1f}"
    assert mezo[-2] in (expected, f"{expected} (lr {float(chosen['lr']):g})")


def test_a_deadline_stops_the_running_cells_and_keeps_the_rest_for_later(tiny_model_dir, tmp_path):
    # A cell of 100,000 steps is still running at a 3-second deadline: it is stopped, nothing is recorded,
    # and the call ends in time; the next call finds the cell still to run.
    grid = {"base": {"model.name": str(tiny_model_dir), "data.data_dir": str(SHARED_DATA), "data.n_train": 16,
                     "data.n_dev": 8, "data.n_test": 8, "train.steps": 100000, "train.batch_size": 4,
                     "train.progress": "false", "train.zero_shot": "false"},
            "runs_dir": str(tmp_path / "runs"), "results_csv": str(tmp_path / "results.csv"),
            "rows": {"mezo": {"optim.method": "mezo", "optim.trainable": "all"}},
            "stages": {"lr": {"tasks": ["sst2"], "seeds": [0], "lr_factors": [1]}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    argv = [sys.executable, str(SWEEP), str(path), "--stage", "lr"]
    done = subprocess.run(argv + ["--deadline", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopped mezo-sst2-lr1e-05-s0 at the deadline" in done.stdout
    assert not (tmp_path / "results.csv").exists()
    again = subprocess.run(argv + ["--dry-run"], capture_output=True, text=True, timeout=120)
    assert "stage lr: 1 cells to run (0 cells done in all)" in again.stdout
