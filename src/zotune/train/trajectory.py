"""The trajectory is the checkpoint: a ZO run as an append-only log of what each step measured.

Every update of a ZO run is a function of the step's draw keys (run seed, step, query), the
losses it measured and the learning rates. ``trajectory.json`` holds what is fixed for the run
(model, trainable selection, optimizer configuration, seed); ``trajectory.bin`` holds one
fixed-size little-endian record per step: the step (int64), whether the divergence guard
rejected it (uint8), how many earlier updates it rolled back (uint8), how many losses the step
measured (uint16; fewer than the record holds while a query schedule is below its cap), the
losses in measuring order (float64, NaN-padded) and each param group's learning rate (float64).
Replaying the records through the same optimizer, with the recorded losses in place of forward
passes, repeats every weight operation of the run, so the rebuilt weights are bit-identical to the trained ones.

Size: with one two-sided query and one param group a record is 36 bytes, so a 20,000-step run
logs 720 kB.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..optim import philox

HEADER = "trajectory.json"
RECORDS = "trajectory.bin"


def direction_devices(optimizer) -> list[str]:
    """The kinds of device whose generators drew the run's directions (``cpu``, ``cuda``): directions
    differ between them, so a log is replayed on the kinds it was recorded on."""
    return sorted({p.device.type for group in optimizer.param_groups for p in group["params"]})


# The Philox stream of logs written before their header named it: CUDA runs drew from it (blocks of 1,024).
_UNNAMED_STREAM = "philox4x32-10/box-muller/block-1024"


def direction_header(optimizer) -> dict:
    """What a log's header records of where its directions came from (see :func:`check_devices`)."""
    return {"devices": direction_devices(optimizer), "stream": philox.STREAM}


def check_devices(header: dict, here: list[str]) -> None:
    """Refuse to replay a log on other kinds of device than it was recorded on (``here``), or a CUDA log
    drawn from another layout of the Philox stream than this version's."""
    recorded = header.get("devices")
    stream = header.get("stream", _UNNAMED_STREAM)
    if recorded is not None and "cuda" in recorded and stream != philox.STREAM:
        raise ValueError(
            f"this trajectory's directions were drawn on CUDA from the Philox stream {stream!r}, and this version "
            f"of zotune draws {philox.STREAM!r} there, so the weights would not be the run's. Replay it with "
            "the zotune version that recorded it"
        )
    if recorded is not None and recorded != here:
        raise ValueError(
            f"this trajectory was recorded with the trainable weights on {'+'.join(recorded)} and they are on "
            f"{'+'.join(here)} here; each kind of device draws other directions (torch's CPU and CUDA generators "
            "differ, and CUDA runs draw with the fused Philox kernel), so the weights would not be the run's. "
            f"Replay it on a machine where they can (model.device in the run's config.yaml)"
        )


def record_format(num_losses: int, num_groups: int) -> struct.Struct:
    return struct.Struct(f"<qBBH{num_losses}d{num_groups}d")


class TrajectoryWriter:
    def __init__(self, run_dir: Path, header: dict, num_losses: int, num_groups: int) -> None:
        self.format, self.num_losses = record_format(num_losses, num_groups), num_losses
        header = {**header, "num_losses": num_losses, "num_groups": num_groups}
        (Path(run_dir) / HEADER).write_text(json.dumps(header, indent=2), encoding="utf-8")
        self._file = open(Path(run_dir) / RECORDS, "ab")

    def append(self, step: int, losses: tuple[float, ...], lrs: list[float], rejected: bool = False,
               rolled_back: int = 0) -> None:
        padded = tuple(losses) + (float("nan"),) * (self.num_losses - len(losses))
        self._file.write(self.format.pack(step, int(rejected), rolled_back, len(losses), *padded, *lrs))
        self._file.flush()

    def close(self) -> None:
        self._file.close()  # (closing a closed file is a no-op)


def truncate(run_dir: Path, steps: int) -> None:
    """Keep the records of the first ``steps`` steps (resuming from a checkpoint at ``steps``)."""
    header = json.loads((Path(run_dir) / HEADER).read_text(encoding="utf-8"))
    size = record_format(header["num_losses"], header["num_groups"]).size
    path = Path(run_dir) / RECORDS
    if path.exists():
        with open(path, "r+b") as f:
            f.truncate(min(path.stat().st_size, steps * size))


def read(run_dir: Path) -> tuple[dict, list[tuple]]:
    """The header and the records (step, losses, learning rates, rejected, rolled back); a torn
    last record is dropped."""
    run_dir = Path(run_dir)
    if not (run_dir / HEADER).exists():
        raise FileNotFoundError(f"no {HEADER} in {run_dir}")
    header = json.loads((run_dir / HEADER).read_text(encoding="utf-8"))
    n_losses, n_groups = header["num_losses"], header["num_groups"]
    fmt = record_format(n_losses, n_groups)
    data = (run_dir / RECORDS).read_bytes() if (run_dir / RECORDS).exists() else b""
    records = []
    for offset in range(0, len(data) - fmt.size + 1, fmt.size):
        values = fmt.unpack_from(data, offset)
        step, rejected, rolled_back, used, rest = values[0], bool(values[1]), values[2], values[3], values[4:]
        records.append((step, rest[:used], rest[n_losses:], rejected, rolled_back))
    for expected, (step, *_) in enumerate(records):
        if step != expected:
            raise ValueError(f"{run_dir / RECORDS}: record {expected} is for step {step}: the log is corrupt")
    return header, records
