"""Insert, save, load and merge LoRETTA adapters (PEFT's config / layer / model trio: the model).

The model side only finds target modules, replaces them with their wrapped layers and freezes
everything but the adapters (and the norms when asked); the maths lives in :mod:`.tt` and
:mod:`.layers`.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..optim.groups import is_norm_module, trainable_numel  # noqa: F401  (trainable_numel: part of this API)
from ..optim.seeding import derive_seed
from .config import LorettaAdpConfig, LorettaRepConfig, config_from_dict, config_to_dict
from .layers import PREFIX, LorettaAdpLayer, LorettaRepLayer, linear_shape
from .targets import adapter_targets, rep_targets

_CONFIG_ATTR = "zotune_adapter_config"
_METADATA_KEY = "zotune_adapter_config"


def _matches(name: str, key: str) -> bool:
    if key.startswith("re:"):
        return re.fullmatch(key[3:], name) is not None
    return name == key or name.endswith("." + key)


def _targets(model: nn.Module, config) -> dict[str, str]:
    """Module name -> position ("pre"/"post"; "rep" for LoRETTA_rep) of every module to wrap."""
    if config.kind == "adp":
        keys = config.target_modules or adapter_targets(model)
        keys = keys if isinstance(keys, dict) else {k: "post" for k in keys}
    else:
        keys = {k: "rep" for k in (config.target_modules or rep_targets(model))}
    found = {}
    for name, module in model.named_modules():
        for key, position in keys.items():
            if _matches(name, key):
                linear_shape(module)  # raises a clear TypeError for a module that is not linear
                found[name] = position
                break
    missing = [k for k in keys if not any(_matches(n, k) for n in found)]
    if missing:
        raise ValueError(f"target module(s) {missing} match no module of this {type(model).__name__}")
    return found


def _wrap(module: nn.Module, position: str, config, generator: torch.Generator) -> nn.Module:
    if config.kind == "rep":
        return LorettaRepLayer(module, config.r, config.scaling, config.tt_rank, config.dropout, config.max_mode,
                               config.compensate, generator)
    n_in, n_out, _ = linear_shape(module)
    return LorettaAdpLayer(module, n_in if position == "pre" else n_out, position, config.bottleneck,
                           config.tt_rank, config.nonlinearity, config.scale, config.max_mode,
                           config.function_preserving, generator)


def inject(model: nn.Module, config: LorettaAdpConfig | LorettaRepConfig) -> nn.Module:
    """Wrap the target modules of ``model`` in place and leave only the adapters (and norms if asked) trainable.

    Each target's cores are initialised from their own generator, seeded by (config.seed, target
    number), so the same config on the same architecture always gives the same adapters.
    """
    if getattr(model, _CONFIG_ATTR, None) is not None:
        raise ValueError("this model already has LoRETTA adapters; merge() or reload the model first")
    targets = _targets(model, config)
    model.requires_grad_(False)
    for number, (name, position) in enumerate(targets.items()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        generator = torch.Generator().manual_seed(derive_seed(config.seed, number))
        setattr(parent, child, _wrap(getattr(parent, child), position, config, generator))
    for name, p in model.named_parameters():
        if PREFIX in name:
            p.requires_grad_(True)
    if config.train_norms:
        for module in model.modules():
            if is_norm_module(module):
                module.requires_grad_(True)
    setattr(model, _CONFIG_ATTR, config)
    return model


@contextmanager
def disabled(model: nn.Module):
    """Within the block, every LoRETTA_adp adapter of ``model`` is bypassed: the model computes its base
    function (a zero-shot score of the unmodified model). LoRETTA_rep starts at the base function anyway
    (W₀ is compensated), as PEFT LoRA does (B = 0)."""
    layers = [m for m in model.modules() if isinstance(m, LorettaAdpLayer)]
    states = [layer.enabled for layer in layers]
    try:
        for layer in layers:
            layer.enabled = False
        yield model
    finally:
        for layer, state in zip(layers, states):
            layer.enabled = state


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that :func:`save` writes: every ``loretta_`` parameter, and the norms when they are trained."""
    config = _config_of(model)
    norms = set()
    if config.train_norms:
        norms = {id(p) for m in model.modules() if is_norm_module(m) for p in m.parameters(recurse=False)}
    return {name: p.detach() for name, p in model.named_parameters() if PREFIX in name or id(p) in norms}


def save(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters (and trained norms) with their config to one safetensors file."""
    from safetensors.torch import save_file

    config = _config_of(model)
    tensors = {name: t.contiguous().cpu() for name, t in adapter_state(model).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(config_to_dict(config))})
    return path


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """Load adapters saved by :func:`save` into ``model``, injecting them first if it has none."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if _METADATA_KEY not in metadata:
            raise ValueError(f"{path} holds no zotune adapter config (not written by zotune.adapters.save)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved_config = config_from_dict(json.loads(metadata[_METADATA_KEY]))
    current = getattr(model, _CONFIG_ATTR, None)
    if current is None:
        inject(model, saved_config)
    elif config_to_dict(current) != config_to_dict(saved_config):
        raise ValueError(f"{path} was saved with {saved_config}, but the model has {current}")
    expected = adapter_state(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, target in expected.items():
        if tensors[name].shape != target.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensors[name])
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRETTA_rep ΔW into its base weight and remove the wrappers (adp adapters cannot be folded)."""
    config = _config_of(model)
    if config.kind != "rep":
        raise ValueError("merge() folds LoRETTA_rep updates; LoRETTA_adp adapters are non-linear and stay separate")
    unwrap(model, LorettaRepLayer, lambda layer: layer.merged())
    delattr(model, _CONFIG_ATTR)
    return model


def unwrap(model: nn.Module, wrapper: type, inner) -> int:
    """Replace every submodule of type ``wrapper`` by ``inner(submodule)`` (its base layer, merged or not);
    returns how many were replaced."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, wrapper)]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, inner(module))
    return len(found)


def _config_of(model: nn.Module):
    config = getattr(model, _CONFIG_ATTR, None)
    if config is None:
        raise ValueError("this model has no LoRETTA adapters (call zotune.adapters.inject first)")
    return config
