"""zotune: fine-tune language models with forward passes only (zeroth-order optimisation)."""

from .optim import (
    METHODS,
    Batched,
    DriftSafe,
    InPlace,
    NonFiniteLossError,
    QuerySchedule,
    Virtual,
    adazeta,
    ZOOptimizer,
    lozo,
    lozo_m,
    mezo,
    mezo_adam,
    mezo_momentum,
    param_groups,
    tezo,
    tezo_adam,
    tezo_m,
)

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """Load (model, tokenizer) for a hub id, a local folder or a built-in alias.

    See :func:`zotune.models.loading.load_model`; imported lazily so that ``import zotune``
    does not import ``transformers``.
    """
    from .models.loading import load_model as _load_model

    return _load_model(*args, **kwargs)


def __getattr__(name: str):
    """``zotune.ZOTrainer`` is imported on first use (it imports ``transformers``' Trainer)."""
    if name == "ZOTrainer":
        from .hf_trainer import ZOTrainer

        return ZOTrainer
    raise AttributeError(f"module 'zotune' has no attribute {name!r}")


__all__ = [
    "METHODS", "Batched", "DriftSafe", "InPlace", "NonFiniteLossError", "QuerySchedule", "Virtual", "ZOOptimizer",
    "adazeta", "load_model", "lozo", "lozo_m", "mezo", "mezo_adam", "mezo_momentum", "param_groups", "tezo",
    "tezo_adam", "tezo_m", "ZOTrainer", "__version__",
]
