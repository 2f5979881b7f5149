"""Validated configurations of the LoRETTA adapters (PEFT's config / layer / model trio: the config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

NONLINEARITIES = ("relu", "tanh", "gelu", "silu", "identity")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_targets(value) -> None:
    if value is None:
        return
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ValueError(f"target_modules must be a list (or dict) of module names, got {value!r}")
    if not value:
        raise ValueError("target_modules is empty: name at least one module, or leave it None for the defaults")


@dataclass
class LorettaAdpConfig:
    """LoRETTA_adp: tensorized bottleneck adapters h -> h + s·TT_up(act(TT_down(h))) (Yang et al., NAACL 2024, §3.2).

    Args:
        bottleneck: b, the adapter's inner width (64 in the paper).
        tt_rank: r, the inner TT rank of both TT maps (5 in the paper).
        nonlinearity: act (relu, as every reference script passes).
        scale: s.
        train_norms: also train every normalisation layer (the paper's ablation; AdaZeta freezes them).
        target_modules: module names (suffix match, or ``re:<regex>`` for a full match), as a list
            (adapters on the outputs) or a dict name -> "pre" / "post"; None: the architecture's defaults.
        function_preserving: subtract the initial adapter's output (a frozen copy), so the model's
            function is unchanged at initialisation without zeroing a core. On by default: started as
            random maps (the paper's initialisation, ``False``), the adapters cost SmolLM2-135M its
            zero-shot accuracy and ZO training recovers little of it in 1,000 steps (docs/results.md).
        max_mode: largest TT mode when factorising sizes.
        seed: seed of the cores' initialisation.
    """

    bottleneck: int = 64
    tt_rank: int = 5
    nonlinearity: str = "relu"
    scale: float = 1.0
    train_norms: bool = True
    target_modules: Optional[Union[list, dict]] = None
    function_preserving: bool = True
    max_mode: int = 16
    seed: int = 0

    kind = "adp"

    def __post_init__(self) -> None:
        _check_positive_int("bottleneck", self.bottleneck)
        _check_positive_int("tt_rank", self.tt_rank)
        _check_positive_int("max_mode", self.max_mode)
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity {self.nonlinearity!r} is not one of {', '.join(NONLINEARITIES)}")
        _check_targets(self.target_modules)
        if isinstance(self.target_modules, dict):
            bad = {k: v for k, v in self.target_modules.items() if v not in ("pre", "post")}
            if bad:
                raise ValueError(f"adapter positions must be 'pre' or 'post', got {bad}")


@dataclass
class LorettaRepConfig:
    """LoRETTA_rep: y = W0 x + s·TT_B(TT_A(dropout(x))) beside a frozen weight (Yang et al., NAACL 2024, §3.3).

    Args:
        r: r_b, the width between TT_A and TT_B (8).
        alpha: s = alpha / r (16, so s = 2).
        tt_rank: inner TT rank (5 in the paper, 8 in the LLaMA scripts).
        dropout: dropout on the adapter's input.
        target_modules: module names (suffix match, or ``re:<regex>``); None: the LoRA targets of the architecture.
        compensate: subtract the initial ΔW_0 from W0 (in float32), so the model's function is
            unchanged at initialisation while every core stays non-zero.
        train_norms: also train every normalisation layer (the LLaMA scripts train RMSNorm).
        max_mode, seed: as in :class:`LorettaAdpConfig`.
    """

    r: int = 8
    alpha: float = 16.0
    tt_rank: int = 5
    dropout: float = 0.0
    target_modules: Optional[list] = None
    compensate: bool = True
    train_norms: bool = False
    max_mode: int = 16
    seed: int = 0

    kind = "rep"

    def __post_init__(self) -> None:
        _check_positive_int("r", self.r)
        _check_positive_int("tt_rank", self.tt_rank)
        _check_positive_int("max_mode", self.max_mode)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        _check_targets(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


CONFIGS = {cls.kind: cls for cls in (LorettaAdpConfig, LorettaRepConfig)}


def config_to_dict(config) -> dict:
    return {"kind": config.kind, **dataclasses.asdict(config)}


def config_from_dict(data: dict):
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in CONFIGS:
        raise ValueError(f"unknown adapter kind {kind!r}; valid: {', '.join(CONFIGS)}")
    return CONFIGS[kind](**data)
