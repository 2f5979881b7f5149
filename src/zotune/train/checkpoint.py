"""Checkpoints that survive crashes.

A checkpoint is a folder ``checkpoints/step-000123/`` holding

* ``trainable.safetensors``: the trainable weights (safetensors: no pickled objects); absent from
  a trajectory checkpoint (``train.checkpoint=trajectory``), whose weights are the base model's
  with the run's trajectory log replayed onto them up to the checkpoint's step;
* ``optimizer.pt``: the optimizer's state dict (tensors, numbers and strings only, loaded with
  ``torch.load(weights_only=True)``: no arbitrary objects are ever unpickled);
* ``manifest.json``: the step, the loop's extra state (resolved config, data-order position,
  results so far, guard history), and the SHA-256 of both files.

It is written into a temporary folder and renamed into place, and the manifest is written
last: a folder with a manifest whose checksums match is complete, anything else is ignored
(a crash mid-write) or reported (a truncated or tampered file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..optim.shards import is_sharded, local_rows

FILES = ("trainable.safetensors", "optimizer.pt")


class CheckpointError(ValueError):
    """A checkpoint is incomplete, truncated or does not match its manifest."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters (tied weights once), in order."""
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(name)
    return out


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable weights by name (tied weights once), as contiguous copies. Sharded (FSDP2) parameters
    are gathered whole: a collective, which every rank must call."""
    params = dict(model.named_parameters())
    return {name: (params[name].full_tensor() if is_sharded(params[name]) else params[name]).detach().clone()
            .contiguous() for name in trainable_names(model)}


def whole_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with moments sharded like their (FSDP2) parameters gathered into whole
    tensors, so that a run with any number of ranks loads them. A collective: every rank calls it."""
    state = optimizer.state_dict()
    whole = lambda value: value.full_tensor() if is_sharded(value) else value  # noqa: E731
    state["state"] = {key: {name: whole(value) for name, value in entry.items()} if isinstance(entry, dict) else entry
                      for key, entry in state["state"].items()}
    return state


def reshard_optimizer_state(optimizer) -> None:
    """After ``load_state_dict``: each whole-tensor moment of a sharded parameter whose coordinates are
    sharded (dense directions) becomes this rank's rows of it, sharded like the parameter."""
    if not optimizer.perturbation.sharded_coordinates:
        return
    from torch.distributed.tensor import DTensor

    for param, entry in optimizer.state.items():
        if not (isinstance(param, torch.Tensor) and is_sharded(param)):
            continue
        first, rows = local_rows(param)
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and not is_sharded(value) and value.shape == param.shape:
                entry[name] = DTensor.from_local(value[first:first + rows].to(param.device).clone(), param.device_mesh,
                                                 param.placements, run_check=False, shape=param.shape,
                                                 stride=param.stride())


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, extra: dict, keep: int = 2,
                    weights: bool = True, optimizer_state: dict | None = None) -> Path:
    """Write ``run_dir/checkpoints/step-{step}`` atomically; keep the ``keep`` newest.

    ``weights=False`` writes a trajectory checkpoint: the optimizer state and the manifest only.
    ``optimizer_state``: what to save instead of ``optimizer.state_dict()`` (a sharded run's, gathered
    by :func:`whole_optimizer_state` on every rank).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        files = FILES if weights else FILES[1:]
        if weights:
            save_file(trainable_state(model), str(tmp / FILES[0]))
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / FILES[1])
        manifest = {"step": step, "weights": "file" if weights else "trajectory", "extra": extra,
                    "sha256": {name: _sha256(tmp / name) for name in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify(path: Path) -> dict:
    """The manifest of a complete checkpoint, or :class:`CheckpointError` naming what is wrong."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.exists():
        raise CheckpointError(f"{path}: no manifest.json (the checkpoint was not finished)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        expected = manifest["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    holds = FILES if manifest.get("weights", "file") == "file" else FILES[1:]
    for name in holds:
        file = Path(path) / name
        if not file.exists():
            raise CheckpointError(f"{file}: missing")
        if _sha256(file) != expected.get(name):
            raise CheckpointError(f"{file}: checksum does not match the manifest (truncated or modified)")
    return manifest


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder (unfinished ones are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for candidate in sorted((p for p in root.iterdir() if p.name.startswith("step-")), reverse=True):
        if (candidate / "manifest.json").exists():
            return candidate
    return None


def load_trainable(model: nn.Module, file: Path) -> None:
    """Copy the tensors of a safetensors file into the model's parameters of the same names."""
    weights = load_file(str(file))
    params = dict(model.named_parameters())
    unknown = [name for name in weights if name not in params]
    if unknown:
        raise CheckpointError(f"{file}: weights for parameters this model does not have: {unknown[:5]}")
    with torch.no_grad():
        for name, value in weights.items():
            param = params[name]
            if is_sharded(param):  # this process's rows of the whole tensor
                first, rows = local_rows(param)
                param.to_local().copy_(value[first:first + rows])
            else:
                param.copy_(value)


def load_checkpoint(path: Path, model: nn.Module, optimizer, replay: Callable[[int], None] | None = None) -> dict:
    """Restore trainable weights and optimizer state in place; returns the manifest.

    A trajectory checkpoint's weights come from ``replay(step)``, which must bring the base
    model's weights to that step (the trajectory log replayed onto them).
    """
    manifest = verify(path)
    if manifest.get("weights", "file") == "file":
        load_trainable(model, Path(path) / FILES[0])
    elif replay is None:
        raise CheckpointError(f"{path} holds no weights (a trajectory checkpoint): they are rebuilt by replaying "
                              "the run's trajectory log onto the base model")
    else:
        replay(manifest["step"])
    optimizer.load_state_dict(torch.load(Path(path) / FILES[1], weights_only=True))
    reshard_optimizer_state(optimizer)
    return manifest
