"""The registry of methods: one declarative :class:`MethodSpec` per name.

A spec says everything the rest of zotune needs to know about a method without building it:
its factory, the dataclass of its own options (the command line's ``optim.<name>`` fields),
whether it can run on the virtual path, whether its update rule is linear in the estimate
(what replay's rollbacks need), whether it is zeroth-order (a trajectory log can rebuild it),
and its default learning rate for each kind of trainable set. Adding a method is one file
with its factory and options dataclass, and one entry below; ``tests/optim/test_conformance.py``
then checks it like every other (and checks that its spec tells the truth).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from . import aliases as zo
from .first_order import AdamWOptions, adamw

#: The kinds of trainable set a default learning rate is given for: every weight, the norm
#: layers' scales and shifts, and the adapter kinds: zotune's tensor-train adapters (adp: LoRETTA_adp
#: and AdaZeta, with their norms; rep: LoRETTA_rep) and PEFT LoRA.
TRAINABLE_KINDS = ("all", "norms", "adp", "rep", "lora")


@dataclass(frozen=True)
class MethodSpec:
    """What a method is, declared: see the module docstring."""

    name: str
    factory: Callable[..., Any]
    options: type  # frozen dataclass of the method's own options, with their defaults and help
    default_lr: Mapping[str, float]  # per trainable kind (TRAINABLE_KINDS)
    virtual: bool = False  # factored directions: can measure on the virtual path
    linear: bool = False  # update = Σ_i (−η g_i/q) Z_i: rollback and buffer-free replay apply
    zeroth_order: bool = True  # False: backprop (no trajectory log, no ZO execution paths)

    def __post_init__(self) -> None:
        missing = set(TRAINABLE_KINDS) - set(self.default_lr)
        if missing:
            raise ValueError(f"method {self.name!r} has no default lr for {sorted(missing)}")
        object.__setattr__(self, "default_lr", MappingProxyType(dict(self.default_lr)))

    def __call__(self, params, lr: float, **kwargs):
        """The optimizer, as the factory builds it (``METHODS["lozo"](params, lr=1e-6, rank=4)``)."""
        return self.factory(params, lr, **kwargs)

    @property
    def summary(self) -> str:
        return (self.factory.__doc__ or "").strip().splitlines()[0]

    def option_fields(self) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(self.options)}

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` as keyword arguments of the factory; an unknown name is an error naming the valid ones."""
        known = self.option_fields()
        unknown = [name for name in options if name not in known]
        if unknown:
            valid = ", ".join(known) or "none beyond the common ones"
            raise ValueError(f"method {self.name!r} takes no option {', '.join(unknown)} (its options: {valid})")
        return {name: tuple(value) if isinstance(value, list) else value for name, value in options.items()}


# Defaults per trainable kind, from the SmolLM2-135M sweep of docs/results.md (the lr with the best
# SST-2 dev accuracy among 0.1x, 1x and 10x the earlier defaults, and beyond where the best was the
# largest: with one-per-entry directions the SGD-type methods agreed on 1e-5 for all parameters,
# 1e-4 diverging; 1e-3 for LoRA and LoRETTA_rep; 1e-5 for function-preserving LoRETTA_adp, whose
# loss reached 3.15x its first batch's at 1e-4). AdaZeta, averaging up to 10 queries, was best at
# 1e-4 on dev (its runs cut off at step 600). "norms" is the built-in demo's 1e-2. Adam-type rates:
# 1e-4 for all parameters (the sweep), LoRA's and the adapters' by analogy (unswept).
_SGD_LR = {"all": 1e-5, "norms": 1e-2, "adp": 1e-5, "rep": 1e-3, "lora": 1e-3}
_ADAM_LR = {"all": 1e-4, "norms": 1e-3, "adp": 1e-4, "rep": 1e-3, "lora": 1e-3}

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("mezo", zo.mezo, zo.MezoOptions, _SGD_LR, linear=True),
        MethodSpec("mezo_momentum", zo.mezo_momentum, zo.MomentumOptions, _SGD_LR),
        MethodSpec("mezo_adam", zo.mezo_adam, zo.AdamOptions, _ADAM_LR),
        MethodSpec("lozo", zo.lozo, zo.LowRankOptions, _SGD_LR, virtual=True, linear=True),
        MethodSpec("lozo_m", zo.lozo_m, zo.LowRankMomentumOptions, _SGD_LR, virtual=True),
        MethodSpec("tezo", zo.tezo, zo.TemporalCPOptions, _SGD_LR, virtual=True, linear=True),
        MethodSpec("tezo_m", zo.tezo_m, zo.TemporalCPMomentumOptions, _SGD_LR, virtual=True),
        MethodSpec("tezo_adam", zo.tezo_adam, zo.TemporalCPAdamOptions, _ADAM_LR, virtual=True),
        MethodSpec("adazeta", zo.adazeta, zo.QueryScheduleOptions, {**_SGD_LR, "adp": 1e-4}, linear=True),
        MethodSpec("adamw", adamw, AdamWOptions, _ADAM_LR, zeroth_order=False),
    )
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]
