"""Resume from a trajectory checkpoint: the weights rebuilt from the log, and how long that takes.

Runs the same ``zotune train`` twice: once straight through, once stopped by SIGTERM after
``--stop-after`` logged steps (it writes a trajectory checkpoint: the log and the optimizer state, no
weights) and resumed with ``--train.resume true``, which replays the log onto the base model. Prints
the rebuild time the resumed run reports and whether its final trainable weights equal the straight
run's bit for bit. Extra arguments go to both runs.

    python benchmarks/trajectory_resume.py --out /tmp/resume --stop-after 990 -- \\
        --model.device cuda --optim.method mezo --optim.trainable all --train.steps 1000
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "log.jsonl"
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line) if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stop-after", type=int, default=990, help="send SIGTERM once this many steps are logged")
    parser.add_argument("train_args", nargs="*", help="after --: arguments of zotune train")
    args = parser.parse_args()
    common = [sys.executable, "-m", "zotune", "train", *args.train_args, "--train.output_dir", str(args.out),
              "--train.checkpoint", "trajectory", "--train.zero_shot", "false", "--train.progress", "false"]
    straight = subprocess.run(common + ["--train.run_name", "straight"], capture_output=True, text=True)
    if straight.returncode:
        raise SystemExit(f"the straight run failed:\n{straight.stderr[-3000:]}")
    stopped_dir = args.out / "stopped"
    proc = subprocess.Popen(common + ["--train.run_name", "stopped"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while logged_steps(stopped_dir) < args.stop_after and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 130:
        raise SystemExit(f"the run to stop ended with {proc.returncode} before the signal:\n{err[-3000:]}")
    started = time.perf_counter()
    resumed = subprocess.run(common + ["--train.run_name", "stopped", "--train.resume", "true"], capture_output=True,
                             text=True)
    whole = time.perf_counter() - started
    if resumed.returncode:
        raise SystemExit(f"the resumed run failed:\n{resumed.stderr[-3000:]}")
    rebuilt = re.search(r"rebuilt the weights of step (\d+) from the trajectory log \(([\d.]+) s\)", resumed.stdout)
    a, b = load_file(str(args.out / "straight" / "trainable.safetensors")), load_file(
        str(stopped_dir / "trainable.safetensors"))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = {"stopped_at_step": int(rebuilt.group(1)) if rebuilt else None,
              "rebuild_s": float(rebuilt.group(2)) if rebuilt else None, "resumed_process_s": round(whole, 1),
              "tensors": len(a), "bit_identical": same}
    print(json.dumps(result))
    if rebuilt:
        print(f"resumed at step {result['stopped_at_step']}: weights rebuilt from the trajectory log in "
              f"{result['rebuild_s']} s (the resumed process: {whole:.1f} s in all); final weights "
              f"{'bit-identical to' if same else 'DIFFERENT from'} the uninterrupted run's ({len(a)} tensors)")


if __name__ == "__main__":
    main()
