"""Default target modules per architecture (keyed by ``config.model_type``).

adp: where LoRETTA_adp / AdaZeta put their tensorized adapters, and on which side of the
target ("pre": on the layer's input, "post": on its output). Decoders follow the reference code
(LLaMA ``gate_proj``/``up_proj`` pre and ``down_proj`` post; OPT ``fc1`` pre, ``fc2`` post; attention
untouched); encoders get Houlsby placement after the attention-output and FFN-output dense layers.

rep: LoRETTA_rep's targets are LoRA's (query and value projections).
"""

from __future__ import annotations

_LLAMA_ADP = {"gate_proj": "pre", "up_proj": "pre", "down_proj": "post"}
_ENCODER_ADP = {"output.dense": "post"}  # attention-output and FFN-output dense layers

ADAPTER_TARGETS: dict[str, dict[str, str]] = {
    **{name: _LLAMA_ADP for name in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
    "opt": {"fc1": "pre", "fc2": "post"},
    "gpt2": {"mlp.c_fc": "pre", "mlp.c_proj": "post"},
    **{name: _ENCODER_ADP for name in ("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2")},
}

REP_TARGETS: dict[str, list[str]] = {
    **{name: ["q_proj", "v_proj"] for name in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "opt")},
    "phi3": ["qkv_proj"],
    "gpt2": ["attn.c_attn"],
    **{name: ["attention.self.query", "attention.self.value"] for name in ("bert", "roberta", "xlm-roberta")},
    **{name: ["query_proj", "value_proj"] for name in ("deberta", "deberta-v2")},
}


def default_targets(table: dict, model_type: str | None, kind: str):
    if model_type not in table:
        raise ValueError(
            f"no default {kind} targets for model type {model_type!r} (known: {', '.join(sorted(table))}); "
            "pass target_modules= with the module names to adapt"
        )
    return table[model_type]
