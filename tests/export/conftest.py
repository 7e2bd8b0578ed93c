"""Shared pieces of the export tests: tiny LoRA models built in memory, on one thread."""

from __future__ import annotations

import pytest
import torch
from export_helpers import lora_model


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: one thread is faster on a shared 2-core machine, and deterministic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama_lora():
    """A tiny llama with LoRA on every linear layer (B not zero) and its tokenizer."""
    return lora_model("llama")
