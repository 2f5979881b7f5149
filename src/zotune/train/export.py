"""``zotune export RUN_DIR OUT_DIR``: a run's fine-tuned model as a folder that plain ``transformers`` loads.

The base model of the run is loaded as the run loaded it (adapters injected, the same trainable
selection), the run's weights are copied in (the tested ones: the best dev evaluation's when the
run kept them, else the final ones; or weights rebuilt from the trajectory log), LoRA and
LoRETTA_rep updates are merged into the base weights, and ``save_pretrained`` writes the model
with its config, tokenizer and generation config. LoRETTA_adp adapters are non-linear and cannot
be merged: the folder then holds the base model (with its trained norms, if any) and the adapters
as ``zotune_adapters.safetensors``, which ``zotune.adapters.load`` puts back.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from torch import nn

from ..config import from_dict
from .checkpoint import load_trainable
from .recipe import setup

ADAPTERS_FILE = "zotune_adapters.safetensors"


def tested_weights(run_dir: Path) -> Path:
    """The weights the run's reported test metric was measured with."""
    for name in ("best.safetensors", "trainable.safetensors"):
        if (run_dir / name).exists():
            return run_dir / name
    raise FileNotFoundError(f"{run_dir} holds no trained weights (trainable.safetensors): an unfinished run? "
                            "Export its trajectory with --trajectory")


def merge_lora(model: nn.Module) -> int:
    """Fold every PEFT LoRA layer into its base layer and put the base layer back; returns how many."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..adapters.model import unwrap

    def merged(layer):
        layer.merge()  # PEFT folds B A into the base weight
        return layer.get_base_layer()

    return unwrap(model, BaseTunerLayer, merged)


def export(run_dir: str | Path, out_dir: str | Path, base_model: str | None = None, from_trajectory: bool = False,
           say: Callable[[str], None] = print) -> Path:
    """Write the run's fine-tuned model into ``out_dir``; returns it."""
    from .. import adapters

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose a new folder")
    import yaml

    cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")))
    base = base_model or cfg.model.name
    if from_trajectory:
        from .replay import replay

        with tempfile.TemporaryDirectory() as tmp:
            weights = replay(base, run_dir, Path(tmp) / "replayed.safetensors", say=say)
            pieces = setup(cfg, data=False, base_model=base, say=say)
            load_trainable(pieces.model, weights)
    else:
        weights = tested_weights(run_dir)
        pieces = setup(cfg, data=False, base_model=base, say=say)
        load_trainable(pieces.model, weights)
    model, kind = pieces.model, cfg.adapter.kind
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "lora":
        say(f"merged {merge_lora(model)} LoRA layers into their base weights")
    elif kind == "rep":
        adapters.merge(model)
        say("merged the LoRETTA_rep updates into their base weights")
    elif kind == "adp":
        adapters.save(model, out_dir / ADAPTERS_FILE)
        model = _without_adp(model)
        say(f"LoRETTA_adp adapters are non-linear and cannot be merged into the weights: the folder holds the "
            f"base model (with any trained norms) and the adapters in {ADAPTERS_FILE}; put them back with "
            f"zotune.adapters.load(model, '{out_dir / ADAPTERS_FILE}')")
    for p in model.parameters():
        p.requires_grad_(False)
    model.save_pretrained(out_dir)
    pieces.tokenizer.save_pretrained(out_dir)
    source = "the trajectory log" if from_trajectory else weights.name
    say(f"exported {run_dir} ({cfg.optim.method}, weights from {source}) to {out_dir}")
    return out_dir


def _without_adp(model: nn.Module) -> nn.Module:
    """The model with each LoRETTA_adp wrapper replaced by its base layer (the adapters were saved apart)."""
    from ..adapters.layers import LorettaAdpLayer
    from ..adapters.model import unwrap

    unwrap(model, LorettaAdpLayer, lambda layer: layer.base_layer)
    model.__dict__.pop("zotune_adapter_config", None)  # (inject's record of the adapters, now gone)
    return model
