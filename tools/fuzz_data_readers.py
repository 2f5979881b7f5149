"""Mutation fuzzing of the task data readers on the real task files.

Takes real records of every task in the data directory, mutates them (byte flips,
truncation, deleted or retyped fields, odd labels, invalid UTF-8, empty files), writes them as
files and reads them through the same code as training. Every outcome must be examples or a
``DataError`` naming the file; anything else is a failure, printed with the input that caused it.

Usage: python tools/fuzz_data_readers.py --data ../shared/data --seconds 60
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import traceback
from pathlib import Path

from zotune.tasks import TASKS, DataError
from zotune.tasks.data import read_records, to_examples


def mutate_record(record: dict, rng: random.Random) -> dict:
    record = dict(record)
    keys = list(record)
    choice = rng.randrange(5)
    if choice == 0 and keys:
        record.pop(rng.choice(keys))
    elif choice == 1 and keys:
        record[rng.choice(keys)] = rng.choice([None, 0, -1, 3.5, True, [], {}, "", "x" * 50])
    elif choice == 2:
        record["label"] = rng.choice(["maybe", 7, -1, None, "1", "entailment", True, 2.0])
    elif choice == 3 and "target" in record:
        record["target"] = rng.choice([None, {}, [], {"span1_text": 1}])
    elif choice == 4:
        record[rng.choice(["question", "premise", "sentence"])] = rng.choice(["cause", "effect", 5, None])
    return record


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(3)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1 and data:
            del data[rng.randrange(len(data)) :]
        else:
            data[rng.randrange(len(data) + 1) : 0] = rng.choice([b"\xff\xfe", b"\t", b"\n", b"{", b'"'])
    return bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seeds = {}
    for name, task in TASKS.items():
        for split in task.local_files.values():
            for filename in split:
                path = Path(args.data) / task.local_dir / filename
                if path.exists():
                    lines = path.read_text(encoding="utf-8").splitlines()[:200]
                    seeds.setdefault(name, []).append((path.suffix, lines))
    counts = {"inputs": 0, "bytes": 0, "examples": 0, "data_errors": 0, "failures": 0}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        while time.time() - start < args.seconds:
            name = rng.choice(sorted(seeds))
            suffix, lines = rng.choice(seeds[name])
            picked = rng.sample(lines[1:] if suffix == ".tsv" else lines, k=min(len(lines) - 1, rng.randint(1, 6)))
            if suffix == ".jsonl" and rng.random() < 0.6:
                text = "\n".join(json.dumps(mutate_record(json.loads(line), rng)) for line in picked)
                data = text.encode()
            else:
                header = lines[0] + "\n" if suffix == ".tsv" else ""
                data = (header + "\n".join(picked)).encode()
                data = mutate_bytes(data, rng) if rng.random() < 0.8 else (b"" if rng.random() < 0.5 else data)
            path = Path(tmp) / f"input{suffix}"
            path.write_bytes(data)
            counts["inputs"] += 1
            counts["bytes"] += len(data)
            try:
                counts["examples"] += len(to_examples(TASKS[name], read_records(path), str(path)))
            except DataError:
                counts["data_errors"] += 1
            except Exception:
                counts["failures"] += 1
                print(f"FAILURE on task {name}, input {data[:300]!r}\n{traceback.format_exc()}")
    elapsed = time.time() - start
    print(f"fuzzed {counts['inputs']} inputs ({counts['bytes'] / 1e6:.1f} MB) in {elapsed:.0f} s: "
          f"{counts['examples']} examples built, {counts['data_errors']} clear data errors, "
          f"{counts['failures']} failures")
    raise SystemExit(1 if counts["failures"] else 0)


if __name__ == "__main__":
    main()
