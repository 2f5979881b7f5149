"""Parameter groups with no weight decay on norms and biases, decided by module type."""

from __future__ import annotations

from torch import nn

# torch's own normalisation layers; model-specific ones (LlamaRMSNorm, T5LayerNorm, ...) are
# separate classes that do not subclass these, so a class whose *type name* ends in "Norm"
# counts as well.
_NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm_module(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def param_groups(model: nn.Module, weight_decay: float, **group_options) -> list[dict]:
    """Split ``model``'s trainable parameters into a decayed and a non-decayed group.

    Not decayed: every parameter of a normalisation module, and every parameter registered
    under the attribute name ``bias`` of its module. Everything else gets ``weight_decay``.
    Tied parameters appear once. Extra keyword arguments (e.g. ``lr``) go into both groups.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        norm = is_norm_module(module)
        for name, p in module._parameters.items():
            if p is None or not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if norm or name == "bias" else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, **group_options},
        {"params": no_decay, "weight_decay": 0.0, **group_options},
    ]
    return [g for g in groups if g["params"]]


def trainable_numel(model: nn.Module) -> int:
    """Numbers in the parameters that require grad (tied parameters once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
