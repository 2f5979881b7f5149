"""Where a run's numbers are also sent (``train.report_to``): TensorBoard and Weights & Biases.

The run folder's ``log.jsonl`` is the record; a reporter is a view of it. :meth:`RunFolder.log`
hands every record with a step to each reporter as ``scalars(step, {name: number})``, so every
number the console and the log see reaches each tool through that one call.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..config import ConfigError, RunConfig, to_dict


class TensorBoard:
    """Event files in ``<run folder>/tensorboard`` (``tensorboard --logdir runs``)."""

    package = "tensorboard"

    def __init__(self, path: Path, cfg: RunConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(path / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandB:
    """A W&B run named after the run folder, its files under ``<run folder>/wandb``.

    The run id derives from the folder's path, so ``--train.resume true`` continues the same W&B
    run. The project is ``$WANDB_PROJECT`` (default ``zotune``); ``WANDB_MODE=offline`` keeps
    everything local (``wandb sync`` uploads it later).
    """

    package = "wandb"

    def __init__(self, path: Path, cfg: RunConfig) -> None:
        import wandb

        run_id = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "zotune"), name=path.name, id=run_id,
                               resume="allow", dir=str(path), config=to_dict(cfg))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


REPORTERS = {"tensorboard": TensorBoard, "wandb": WandB}


def check_reporters(names: list[str]) -> None:
    """Refuse an unknown name or a tool that is not installed, before the run starts."""
    for name in names:
        reporter = REPORTERS.get(name)
        if reporter is None:
            raise ConfigError(f"train.report_to: unknown {name!r}; choose from {sorted(REPORTERS)}")
        try:
            __import__(reporter.package)
        except ImportError:
            raise ConfigError(f"train.report_to={name} needs the {reporter.package} package: "
                              f"pip install 'zotune[{name}]'") from None


def open_reporters(path: Path, cfg: RunConfig) -> list:
    return [REPORTERS[name](path, cfg) for name in cfg.train.report_to]
