"""Training forwards replayed from CUDA graphs (``train.cuda_graphs``).

A ZO step on a small model is bound by the host launching the forward's kernels, not by the
GPU running them: SmolLM2-135M's forward is ~450 launches of microseconds each. A CUDA graph
records the launches once and replays them with one call. Replays read the weights from the
storage they were captured with, and the in-place execution path writes the perturbation into
that same storage, so one capture serves every step (no re-capture between the ± evaluations).

:class:`CapturedCausalLM` stands in for the model where the training loss calls it
(``model(input_ids=..., attention_mask=..., position_ids=..., logits_to_keep=...)``, the last
positions to keep as a count or as their indices):

* shapes must repeat, so the sequence length is left-padded to a few lengths (:func:`padded_length`:
  multiples of ``bucket`` tokens, coarser for long sequences, at most a quarter more than the batch's
  own length beyond ``4·bucket``); left padding keeps the last positions, the ones scored, where
  they were;
* the padding mask becomes the 4-D mask the attention reads (causal and key-is-real, plus the
  diagonal so that a padding query attends to itself and stays finite), built inside the graph:
  transformers' own mask code inspects the mask's values on the host, which capture forbids;
* a shape's first call warms up and captures (all graphs share one memory pool); a capture that
  fails (a model with host synchronisation or dynamic control flow in its forward) warns once
  and every later call runs the model eagerly, unchanged;
* on the batched path (:class:`~zotune.optim.batched.Batched`) the forward runs with the per-copy
  layers installed, reading the copies' values from stacks that persist across steps; when the
  stacks move to new storage (AdaZeta's query count grows) ``storage_version`` changes and every
  graph is captured again;
* with ``compile`` (``train.compile``) the forward is compiled by ``torch.compile`` before it is
  captured: its compiler fuses the frozen network's elementwise kernels (norms, rotary embedding,
  activations, residual sums), which a graph replays but does not merge. A compilation that fails
  warns once and the uncompiled forward is captured instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from ..eval.scoring import last_positions

#: Attention implementations whose 4-D mask format is known: sdpa takes a boolean mask (True:
#: attend), eager an additive one (0 or the dtype's minimum).
MASK_FORMATS = ("sdpa", "eager")


def capture_unsupported(model: nn.Module) -> str | None:
    """Why ``model``'s training forwards cannot be captured, or None."""
    params = list(model.parameters())
    if not params or any(not p.is_cuda for p in params):
        return "the model is not (entirely) on a CUDA device"
    if len({p.device for p in params}) > 1:
        return "the model is spread over several devices"
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in MASK_FORMATS:
        return f"attention implementation {implementation!r} (CUDA graphs support {', '.join(MASK_FORMATS)})"
    return None


class CapturedCausalLM:
    """Calls a causal LM like the scoring code does, replaying one CUDA graph per input shape."""

    def __init__(self, model: nn.Module, bucket: int = 8, capture: bool = True,
                 storage_version: Callable[[], int] | None = None, compile: str | Callable | None = None) -> None:
        self.model, self.bucket, self.capture = model, bucket, capture
        self.storage_version, self._version = storage_version, None
        self.forward = model.forward  # the scoring code reads its signature
        # What runs the forward: the model, or its torch.compile'd form with this backend (e.g. "inductor")
        self.backend = compile
        self._run = torch.compile(model, backend=compile) if compile else model
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, Tensor]] = {}
        self._pool = None
        self.failure: str | None = None  # why capture was abandoned, once it was

    def parameters(self, recurse: bool = True):
        return self.model.parameters(recurse)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None,
                 logits_to_keep: int | Tensor = 0, **rest) -> SimpleNamespace:
        if self.failure is not None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              logits_to_keep=logits_to_keep, **rest)
        if isinstance(logits_to_keep, Tensor):  # the scoring code's form: the last positions' indices
            logits_to_keep = logits_to_keep.numel()
        if logits_to_keep < 1:
            raise ValueError("CapturedCausalLM needs logits_to_keep >= 1 (the scored positions)")
        padded = padded_length(input_ids.shape[1], self.bucket)
        inputs = {"input_ids": _left_pad(input_ids, padded, 0), "attention_mask": _left_pad(attention_mask, padded, 0),
                  "position_ids": _left_pad(position_ids if position_ids is not None else _positions(attention_mask),
                                            padded, 0)}
        key = (input_ids.shape[0], padded, logits_to_keep, str(input_ids.device))
        if not self.capture:  # the same computation, eagerly: what the tests compare on the CPU
            return SimpleNamespace(logits=self._logits_or_uncompiled(inputs, logits_to_keep))
        if self.storage_version is not None and self.storage_version() != self._version:
            # The graphs read storage that has been replaced. Their memory pool goes with them: the
            # allocator frees a private pool once no graph holds it, so its old handle must not be reused.
            self._graphs.clear()
            self._pool = None
            self._version = self.storage_version()
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._graphs[key] = self._record(inputs, logits_to_keep)
            except Exception as error:  # noqa: BLE001 -- any capture failure falls back to eager forwards
                self.failure = f"{type(error).__name__}: {error}".splitlines()[0]
                warnings.warn(f"CUDA graph capture of {type(self.model).__name__}'s forward failed ({self.failure}); "
                              "the training forwards run eagerly (train.cuda_graphs=false skips the attempt)",
                              RuntimeWarning, stacklevel=2)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # let a half-recorded capture's stream settle before running eagerly
                return self(input_ids, attention_mask, position_ids, logits_to_keep, **rest)
        graph, static, out = entry
        for name, value in inputs.items():
            static[name].copy_(value)
        graph.replay()
        return SimpleNamespace(logits=out.clone())  # the next replay overwrites ``out``

    def _logits(self, inputs: dict[str, Tensor], keep: int) -> Tensor:
        """(B, keep, vocab) logits at the last ``keep`` positions, with the mask built from the inputs."""
        mask = _attention_mask_4d(inputs["attention_mask"], self.model.config._attn_implementation,
                                  self.model.dtype)
        positions = last_positions(inputs["input_ids"].shape[1], keep, mask.device)
        return self._run(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=inputs["position_ids"],
                         logits_to_keep=positions, use_cache=False).logits

    def _record(self, inputs: dict[str, Tensor], keep: int):
        static = {name: value.clone() for name, value in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # warm-up outside the graph: lazy initialisation, cuBLAS workspaces, compilation
                self._logits_or_uncompiled(static, keep)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool):
            out = self._logits(static, keep)
        self._pool = graph.pool()
        return graph, static, out

    def _logits_or_uncompiled(self, inputs: dict[str, Tensor], keep: int) -> Tensor:
        """:meth:`_logits`; where the compiled forward fails, the model's own from then on (one warning)."""
        try:
            return self._logits(inputs, keep)
        except Exception as error:  # noqa: BLE001 -- any compiler failure falls back to the uncompiled forward
            if self._run is self.model:
                raise
            error = getattr(error, "inner_exception", error)  # the compiler's own error, not dynamo's wrapper
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            warnings.warn(f"torch.compile of {type(self.model).__name__}'s forward failed ({reason}); the training "
                          "forwards run uncompiled (train.compile=false skips the attempt)", RuntimeWarning,
                          stacklevel=3)
            self._run, self.backend = self.model, None
            return self._logits(inputs, keep)


def padded_length(length: int, bucket: int) -> int:
    """The length a batch of ``length`` tokens is padded to: a multiple of ``bucket``, or of a quarter of the
    largest power of two not above ``length`` where that is coarser. Padding costs at most ``bucket - 1``
    tokens, or a quarter of the length, while a run sees few distinct shapes (four per doubling of the
    length, each one CUDA graph)."""
    step = max(bucket, 2 ** (length.bit_length() - 3)) if length > 0 else bucket
    return math.ceil(length / step) * step


def _left_pad(values: Tensor, length: int, fill: int) -> Tensor:
    missing = length - values.shape[1]
    if missing == 0:
        return values
    return torch.cat([values.new_full((values.shape[0], missing), fill), values], dim=1)


def _positions(attention_mask: Tensor) -> Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _attention_mask_4d(padding: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """(B, 1, L, L) mask from a (B, L) padding mask: causal, real keys only, and the diagonal."""
    length = padding.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=padding.device).tril()
    allowed = causal & padding.bool()[:, None, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=padding.device)
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=padding.device).masked_fill_(~allowed,
                                                                                       torch.finfo(dtype).min)
