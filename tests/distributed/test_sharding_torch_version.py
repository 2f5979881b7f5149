"""Sharding refuses, with one clear error, a torch whose FSDP2 cannot serve a ZO step."""

import pytest
import torch
from torch.torch_version import TorchVersion

from conftest import tiny_llama
from zotune.dist import shard


def test_shard_refuses_a_torch_older_than_2_8(monkeypatch):
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.7.1+cu126"))
    with pytest.raises(RuntimeError, match=r"needs torch 2\.8 or newer; this is torch 2\.7\.1"):
        shard(tiny_llama())  # refused before any process group or mesh is needed
