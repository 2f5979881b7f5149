"""What zotune knows about each model family, in one table.

A :class:`Family` entry holds everything that depends on the architecture: the ``model_type``
values of its ``transformers`` configs, the parameter names of its final norm (the built-in
demo's small trainable set, ``optim.trainable=final_norm``, the default without adapters), where LoRETTA_adp puts
its adapters, and which projections LoRETTA_rep and LoRA adapt. The virtual path needs no entry:
it dispatches on module types (:data:`zotune.optim.virtual.HOOKS`). A model of a family not
listed here works with explicit choices (``optim.trainable``, ``adapter.target_modules``); the
error says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    final_norm: str  # regex (re.search) over parameter names selecting the final norm's parameters
    # LoRETTA_adp / AdaZeta: module name -> "pre" (adapter on the layer's input) or "post" (on its output)
    adapter_targets: dict[str, str] = field(default_factory=dict)
    rep_targets: tuple[str, ...] = ()  # LoRETTA_rep and LoRA: the query and value projections


# Decoders follow the LoRETTA/AdaZeta reference code (LLaMA gate_proj/up_proj pre and down_proj
# post; OPT fc1 pre, fc2 post; attention untouched); encoders get Houlsby placement after the
# attention-output and FFN-output dense layers.
_LLAMA_ADAPTERS = {"gate_proj": "pre", "up_proj": "pre", "down_proj": "post"}
_ENCODER_ADAPTERS = {"output.dense": "post"}
_ENCODER_MLM_NORM = r"^(cls\.predictions\.transform\.LayerNorm|lm_head\.layer_norm)\.(weight|bias)$"

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
           r"^model\.norm\.weight$", _LLAMA_ADAPTERS, ("q_proj", "v_proj")),
    Family("phi3", ("phi3",), r"^model\.norm\.weight$", {"gate_up_proj": "pre", "down_proj": "post"}, ("qkv_proj",)),
    Family("phi", ("phi",), r"^model\.final_layernorm\.(weight|bias)$", {"fc1": "pre", "fc2": "post"},
           ("q_proj", "v_proj")),
    Family("opt", ("opt",), r"^model\.decoder\.final_layer_norm\.(weight|bias)$", {"fc1": "pre", "fc2": "post"},
           ("q_proj", "v_proj")),
    Family("gpt2", ("gpt2",), r"^transformer\.ln_f\.(weight|bias)$", {"mlp.c_fc": "pre", "mlp.c_proj": "post"},
           ("attn.c_attn",)),
    Family("gpt_neox", ("gpt_neox",), r"^gpt_neox\.final_layer_norm\.(weight|bias)$",
           {"mlp.dense_h_to_4h": "pre", "mlp.dense_4h_to_h": "post"}, ("attention.query_key_value",)),
    Family("bert", ("bert", "roberta", "xlm-roberta"), _ENCODER_MLM_NORM, _ENCODER_ADAPTERS,
           ("attention.self.query", "attention.self.value")),
    Family("deberta", ("deberta", "deberta-v2"), r"^(cls|lm_predictions)\..*LayerNorm\.(weight|bias)$",
           _ENCODER_ADAPTERS, ("query_proj", "value_proj")),
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_of(model_type: str | None, needed_for: str, what_to_pass: str) -> Family:
    """The family of ``model_type``, or an error naming the explicit setting that replaces the table."""
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise ValueError(f"zotune has no {needed_for} for model type {model_type!r} (known: {known}); "
                         f"pass {what_to_pass}")
    return family


def model_type_of(model) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)
