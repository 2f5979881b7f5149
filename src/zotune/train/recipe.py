"""``setup``: the pieces every command builds from a configuration (train, bench, replay, eval).

In order, so that cheap checks fail before expensive work: the task's data (its files are read
and checked before any weight is), the model, the adapters and the trainable selection, and the
learning rate resolved for that selection. What a command then does with them is its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import RunConfig
from ..eval.scoring import encode
from .setup import check_device, load_configured_model, prepare_trainable, resolve_lr, task_splits


@dataclass
class Setup:
    cfg: RunConfig  # optim.lr resolved when trainable parameters were chosen
    model: nn.Module
    tokenizer: object
    n_trainable: int  # 0 when nothing was made trainable (evaluation only)
    task: object = None  # None without data (replay)
    splits: object = None
    masked: bool = False

    def encode(self, examples: list) -> list:
        """Examples tokenised once for the model's kind (causal or masked LM)."""
        return encode(self.tokenizer, examples, self.cfg.model.max_length, self.masked)


def setup(cfg: RunConfig, *, data: bool = True, sizes: tuple | None = None, trainable: bool = True,
          base_model: str | None = None, say: Callable[[str], None] = print) -> Setup:
    """Build the run's pieces.

    Args:
        data: load the task's splits (``sizes`` = (n_train, n_dev, n_test) overrides the config's; None keeps it).
        trainable: insert the adapters, choose the trainable parameters and resolve the learning rate.
        base_model: load this model instead of ``cfg.model.name`` (replay onto a base model).
    """
    check_device(cfg.model)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.model.device.startswith("cuda") or cfg.model.device_map:  # torch's process-wide switch, set by the run
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.model.tf32
    task = splits = None
    masked = False
    if data:
        task, splits, masked = task_splits(cfg, *(sizes or (None, None, None)))
        for note in splits.notes:
            say(f"note: {note}")
    model, tokenizer = load_configured_model(cfg.model, name=base_model)
    n_trainable = 0
    if trainable:
        n_trainable = prepare_trainable(model, cfg)
        cfg = resolve_lr(cfg, model)
    return Setup(cfg, model, tokenizer, n_trainable, task, splits, masked)
