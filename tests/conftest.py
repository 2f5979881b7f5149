"""Shared fixtures: tiny transformer models built from configs (random weights, no downloads)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# No test reaches the Hugging Face hub: a name that is not local fails at once (tests of that path
# point the hub client at a closed port on this machine instead).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Under pytest-xdist the workers share the machine's cores: each worker (and every process a test starts,
# through the environment) gets its share of threads instead of all of them, so that OpenMP pools do not
# oversubscribe the cores and wait on each other.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


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


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return BertForMaskedLM(config).eval()


def lm_closure(model, input_ids):
    """Closure returning the causal-LM loss of ``model`` on a fixed batch."""

    def closure():
        return model(input_ids=input_ids, labels=input_ids).loss

    return closure


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the real task files are not at {SHARED_DATA}"
)


def byte_tokenizer():
    """A byte-level tokenizer built in code (256 byte tokens + <eos>, <pad>): no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"], vocab["<pad>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny LLaMA with a byte-level tokenizer: a local model folder for end-to-end tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 64, (4, 16), generator=g)


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

from zotune.dist.sharding import FSDP_NEEDS, fsdp_supported  # noqa: E402  (after the environment above)

needs_fsdp = pytest.mark.skipif(not fsdp_supported(), reason=FSDP_NEEDS)


# A Python with Triton's interpreter on, for the whole session (started at the first call: each start imports
# torch and triton for seconds): it runs each code it is sent in fresh globals and answers on one line
# that starts with a marker (anything else on its stdout, say a library's own print, is passed over).
_REPLY = "@@interpreter-reply@@ "
_INTERPRETER_LOOP = r"""
import contextlib, io, json, sys, traceback
for line in sys.stdin:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(json.loads(line), "<interpreted>", "exec"), {"__name__": "__interpreted__"})
        reply = {"stdout": out.getvalue()}
    except BaseException:
        reply = {"stdout": out.getvalue(), "error": traceback.format_exc()}
    print(sys.argv[1] + json.dumps(reply), flush=True)
"""
_interpreter: list[subprocess.Popen] = []


def run_interpreted(code: str) -> dict:
    """Run ``code`` with Triton's interpreter on (``TRITON_INTERPRET`` is read when triton is imported, so in
    another process than this one) and return the JSON object its last printed line holds."""
    if not _interpreter or _interpreter[0].poll() is not None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        _interpreter[:] = [subprocess.Popen([sys.executable, "-c", _INTERPRETER_LOOP, _REPLY], env=env, text=True,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)]
    process = _interpreter[0]
    process.stdin.write(json.dumps(code) + "\n")
    process.stdin.flush()
    line = process.stdout.readline()
    while line and not line.startswith(_REPLY):
        line = process.stdout.readline()
    assert line, f"the interpreter process ended (exit {process.wait()})"
    reply = json.loads(line[len(_REPLY):])
    assert "error" not in reply, reply["error"][-2000:]
    return json.loads(reply["stdout"].strip().splitlines()[-1])


def pytest_sessionfinish(session, exitstatus):
    for process in _interpreter:  # its loop ends at the end of its input
        process.stdin.close()
        process.wait(timeout=60)
        process.stdout.close()
