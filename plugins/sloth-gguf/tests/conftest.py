"""Shared fixtures of sloth-gguf's tests: tiny models, prompts, and exports made once.

llama.cpp runs only in child processes (sloth_core.sdk.llama_cpp), one per GGUF file
and batch of prompts. Tests that need it are skipped when llama-cpp-python is missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf_helpers import PROMPT_LINES, export, small_lm, tiny


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def manager():
    """A plugin manager with sloth-gguf alone registered (its exporter and verifier)."""
    from sloth_gguf import plugin

    from sloth_core.plugins import SlothPluginManager

    manager = SlothPluginManager(entry_points=False)
    manager.register(plugin, "sloth-gguf")
    return manager


@pytest.fixture(scope="session")
def tokenizer():
    from sloth_core.testing import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    """Token ids with the bos: corpus lines (past Gemma's 16-token window), a chat, a word."""
    from sloth_core.testing.tokenizer import corpus_lines

    texts = list(corpus_lines()[:PROMPT_LINES])
    chat = [{"role": "user", "content": "Tea or coffee?"}, {"role": "assistant", "content": "Tea."}]
    texts.append(tokenizer.apply_chat_template(chat, tokenize=False))
    ids = [tokenizer(t, add_special_tokens=not t.startswith(tokenizer.bos_token))["input_ids"][:40]
           for t in texts]  # fmt: skip
    return [*ids, tokenizer("Hi")["input_ids"]]


@pytest.fixture(scope="session")
def models():
    """Tiny models by architecture, built once."""
    cache: dict[str, torch.nn.Module] = {}

    def get(arch: str) -> torch.nn.Module:
        if arch not in cache:
            cache[arch] = tiny(arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def small_lms(tokenizer):
    """Small trained language models by architecture (gguf_helpers.small_lm), built once."""
    cache: dict[str, torch.nn.Module] = {}

    def get(arch: str) -> torch.nn.Module:
        if arch not in cache:
            cache[arch] = small_lm(arch, tokenizer)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def exported(models, small_lms, tokenizer, tmp_path_factory):
    """``exported(arch, quantization, small=False)``: the GGUF file of the tiny model (of
    the small language model with ``small=True``), written once."""
    folder = tmp_path_factory.mktemp("gguf")
    cache: dict[tuple[str, str, bool], Path] = {}

    def get(arch: str, quantization: str, small: bool = False) -> Path:
        key = (arch, quantization, small)
        if key not in cache:
            model = small_lms(arch) if small else models(arch)
            name = f"{arch}-{'small-' if small else ''}{quantization}.gguf"
            cache[key] = export(model, tokenizer, folder / name, quantization)
        return cache[key]

    return get
