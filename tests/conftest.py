"""Shared fixtures: tiny transformer models built from configs (random weights, no downloads)."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)  # test set-up only; the library never touches the global RNG
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_opt(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32,
    )
    torch.manual_seed(seed)
    return OPTForCausalLM(config).to(dtype).eval()


def lm_closure(model, input_ids):
    """Closure returning the causal-LM loss of ``model`` on a fixed batch."""

    def closure():
        return model(input_ids=input_ids, labels=input_ids).loss

    return closure


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 64, (4, 16), generator=g)
