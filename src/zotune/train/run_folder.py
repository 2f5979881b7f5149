"""A run folder: resolved config, a JSONL log of every step, final results and weights.

``results.json`` is written last and atomically, so a folder without it is an unfinished run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from ..config import RunConfig, to_dict


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunFolder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._log = open(path / "log.jsonl", "a", encoding="utf-8")

    @classmethod
    def create(cls, cfg: RunConfig) -> "RunFolder":
        name = cfg.train.run_name or f"{cfg.data.task}-{cfg.optim.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = Path(cfg.train.output_dir) / name
        if (path / "results.json").exists():
            raise FileExistsError(f"{path} already holds a finished run; choose another train.run_name")
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write(path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return cls(path)

    def log(self, **record) -> None:
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()

    def finish(self, results: dict) -> None:
        self._log.close()
        _atomic_write(self.path / "results.json", json.dumps(results, indent=2) + "\n")
