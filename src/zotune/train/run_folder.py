"""A run folder: resolved config, a JSONL log of every step, final results and weights.

``results.json`` is written last and atomically, so a folder without it is an unfinished run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from ..config import ConfigError, RunConfig, apply_overrides, flatten, to_dict
from .reporters import open_reporters

#: Settings a resume may change: how the run is watched, where its data and its folder live (a run folder
#: may be moved or renamed), how long it goes on.
CHANGEABLE_ON_RESUME = frozenset({
    "train.progress", "train.threads", "train.dist_timeout", "train.eval_batch_size",
    "train.eval_every", "train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.report_to",
    "train.checkpoint",
    "data.data_dir", "train.output_dir", "train.run_name",
})


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunFolder:
    """Writes into ``path``; with ``writer=False`` (ranks other than 0 of a distributed run) it only knows the path."""

    def __init__(self, path: Path, writer: bool = True, reporters: list | None = None) -> None:
        self.path, self.writer = path, writer
        self._log = open(path / "log.jsonl", "a", encoding="utf-8") if writer else None
        self._reporters = reporters or []  # views of the log (train.report_to)

    @staticmethod
    def check(cfg: RunConfig) -> Path:
        """The run folder's path, or an error if it cannot be used (no side effects: call it early)."""
        if cfg.train.resume and not cfg.train.run_name:
            raise ValueError("train.resume needs train.run_name (the run folder to continue)")
        name = cfg.train.run_name or f"{cfg.data.task}-{cfg.optim.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = Path(cfg.train.output_dir) / name
        if (path / "results.json").exists():
            raise FileExistsError(f"{path} already holds a finished run; choose another train.run_name")
        if cfg.train.resume:
            if not path.is_dir():
                raise FileNotFoundError(f"nothing to resume: no run folder {path}")
        elif path.exists() and any(path.iterdir()):
            raise FileExistsError(
                f"{path} holds an unfinished run: continue it with --train.resume true, or choose another run_name"
            )
        return path

    @staticmethod
    def resumed_config(cfg: RunConfig, path: Path) -> tuple[RunConfig, dict]:
        """The configuration a resume of the run in ``path`` continues with, and what it changes.

        Settings left at None take the recorded values (the learning rate the run resolved, say);
        a setting given with another value than the recorded one is refused, naming both, unless it
        only changes how the run is watched or how long it goes on (:data:`CHANGEABLE_ON_RESUME`):
        those apply from the resumed step on, and the returned dict {key: [recorded, now]} is logged.
        """
        record = path / "config.yaml"
        if not record.exists():
            return cfg, {}
        recorded = flatten(yaml.safe_load(record.read_text(encoding="utf-8")) or {})
        now = flatten(to_dict(cfg))
        filled, changes = {}, {}
        for key, value in now.items():
            if key not in recorded or value == recorded[key] or key == "train.resume":
                continue
            if value is None:
                filled[key] = recorded[key]
            elif key in CHANGEABLE_ON_RESUME:
                changes[key] = [recorded[key], value]
            else:
                raise ConfigError(
                    f"{path} was started with {key}={recorded[key]!r}; this resume gives {key}={value!r}. A resume "
                    "continues the recorded run: drop the setting (or give the recorded value), or start a new run "
                    "with another train.run_name"
                )
        return (apply_overrides(cfg, filled) if filled else cfg), changes

    @classmethod
    def create(cls, path: Path, cfg: RunConfig, writer: bool = True) -> "RunFolder":
        """Open ``path`` (from :meth:`check`) for writing, recording the resolved config."""
        if not writer:
            return cls(path, writer=False)
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write(path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return cls(path, reporters=open_reporters(path, cfg))

    def truncate_log(self, steps: int) -> None:
        """Drop log lines of steps after ``steps`` (written after the checkpoint we resume from)."""
        if not self.writer:
            return
        self._log.close()
        lines = (self.path / "log.jsonl").read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= steps]
        _atomic_write(self.path / "log.jsonl", "".join(line + "\n" for line in kept))
        self._log = open(self.path / "log.jsonl", "a", encoding="utf-8")

    def log(self, **record) -> None:
        if not self.writer:
            return
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()
        scalars = {key: value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self._reporters and "step" in record and scalars:
            for reporter in self._reporters:
                reporter.scalars(record["step"], scalars)

    def close(self) -> None:
        """Close the log files (idempotent; the run's phases call it however the run ends)."""
        if self._log is not None:
            self._log.close()
        for reporter in self._reporters:
            reporter.close()
        self._reporters = []

    def finish(self, results: dict) -> None:
        self.close()
        if self.writer:
            _atomic_write(self.path / "results.json", json.dumps(results, indent=2) + "\n")
