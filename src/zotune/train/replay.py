"""``zotune replay``: rebuild a ZO fine-tune from its base model and its trajectory log."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import from_dict, load_yaml
from ..optim import NonFiniteLossError, get_method
from . import trajectory
from .checkpoint import trainable_names, trainable_state
from .recipe import setup
from .setup import build_guard, build_optimizer


def recorded_closure(losses: tuple[float, ...]):
    """A closure that answers the optimizer's measurements with the recorded losses, in order."""
    pending = iter(losses)

    def closure(copies: int | None = None):
        if copies is None:
            return next(pending)
        return torch.tensor([next(pending) for _ in range(copies)], dtype=torch.float64)

    return closure


def apply_records(optimizer, records: list[tuple], progress: bool = True) -> None:
    """Repeat the recorded steps on the optimizer's weights, the recorded losses standing in for the
    measurements (learning rates, query counts, guard rejections and rollbacks as recorded)."""
    applied = []  # (record, lrs) of applied updates, for the guard's rollbacks
    for _, losses, lrs, rejected, rolled_back in tqdm(records, desc="replay", disable=not progress, unit="step"):
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        # q of this step (a query schedule changes it): its measurements over the points per query
        optimizer.set_num_queries(optimizer.estimator.queries_for(len(losses)))
        try:
            optimizer.step(recorded_closure(losses), accept=lambda _record, ok=not rejected: ok)
        except NonFiniteLossError:
            pass  # the run stopped at this step too: the weights were restored
        if not optimizer.last_record.skipped:
            applied.append((optimizer.last_record, list(lrs)))
        if rolled_back:
            optimizer.rollback(applied[-rolled_back:])
            del applied[-rolled_back:]


def replay(base_model: str, run_dir: str | Path, output: str | Path | None = None, progress: bool = True,
           say: Callable[[str], None] = print) -> Path:
    """Apply every recorded step to ``base_model`` and save the trained weights (safetensors).

    No forward pass runs: each step moves the weights exactly as the training step did, with
    the recorded losses standing in for the measurements, so in float32 the result is
    bit-identical to the weights the run ended with.
    """
    run_dir = Path(run_dir)
    if not (run_dir / trajectory.HEADER).exists() and (run_dir / "config.yaml").exists():
        method = load_yaml(run_dir / "config.yaml").optim.method
        if not get_method(method).zeroth_order:
            raise ValueError(f"{run_dir} trained with {method}, a first-order method, which keeps no trajectory "
                             "to replay; its weights are trainable.safetensors")
    header, records = trajectory.read(run_dir)
    planned = header["config"]["train"]["steps"]
    finished = (run_dir / "results.json").exists()
    state = "finished" if finished else "unfinished (no results.json: stopped or still running)"
    say(f"{run_dir}: {len(records)} of {planned} steps recorded; the run is {state}")
    if not records:
        raise ValueError(f"{run_dir / trajectory.RECORDS} records no step: nothing to replay (the run stopped "
                         "before its first step ended)")
    if "cuda" in header.get("devices", []) and not torch.cuda.is_available():
        trajectory.check_devices(header, ["cpu"])  # before loading: the recorded config's device is not here
    pieces = setup(from_dict(header["config"]), data=False, base_model=base_model, say=say)
    cfg, model = pieces.cfg, pieces.model
    names = trainable_names(model)
    if names != header["trainable_names"]:
        raise ValueError(f"{base_model} does not have the trainable parameters the log was written for")
    guarded = build_guard(cfg) is not None
    optimizer = build_optimizer(cfg.optim, model, cfg.train.seed, nan_policy="skip" if guarded else None)
    trajectory.check_devices(header, trajectory.direction_devices(optimizer))
    if len(optimizer.param_groups) != header["num_groups"]:
        raise ValueError("the rebuilt optimizer has a different number of param groups than the log")
    apply_records(optimizer, records, progress)
    optimizer.execution.close()  # (an offload path's deferred updates land in the weights)
    output = Path(output) if output else run_dir / "replayed.safetensors"
    rebuilt = trainable_state(model)
    save_file(rebuilt, str(output))
    say(f"replayed {len(records)} steps of {run_dir} onto {base_model}: {output}")
    final = run_dir / "trainable.safetensors"
    if finished and final.exists():
        say(compare_weights(rebuilt, load_file(str(final)), "the run's final weights"))
    return output


def compare_weights(rebuilt: dict, saved: dict, what: str) -> str:
    """"bit-identical to <what>", or the largest difference and where it is."""
    if rebuilt.keys() != saved.keys():
        return f"differs from {what}: other parameters ({sorted(set(rebuilt) ^ set(saved))[:3]})"
    worst, where = 0.0, None
    for name, tensor in rebuilt.items():
        if torch.equal(tensor, saved[name]):
            continue
        diff = (tensor.double() - saved[name].double()).abs().max().item()
        if where is None or diff > worst:
            worst, where = diff, name
    if where is None:
        return f"bit-identical to {what}"
    return f"differs from {what}: largest difference {worst:.3g} in {where}"
