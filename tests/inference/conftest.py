"""Shared pieces of the inference tests: one thread, tiny models on disk, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _single_thread(single_thread):
    """Every test here on one torch thread (the fixture of sloth's pytest plugin)."""


@pytest.fixture(autouse=True)
def _torch_ops(request, monkeypatch):
    """The references serve the ops: these tests are about loading, prompting, decoding and
    modes, not the kernels (tested against them elsewhere), which CI's TRITON_INTERPRET=1
    would run interpreted (minutes a test). The parity tests keep the kernels."""
    if request.module.__name__.rsplit(".", 1)[-1] != "test_inference_parity":
        monkeypatch.setenv("SLOTH_KERNELS", "torch")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny llama (2 layers, context 256) with the test tokenizer's ChatML template."""
    from sloth_core.testing.models import tiny_model

    return tiny_model("llama", tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture
def sloth(capsys):
    """``sloth(*argv)`` runs the CLI in this process: ``(exit status, stdout, stderr)``."""
    from sloth_core.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture
def generate_json(sloth):
    """``generate_json(model, prompt, *flags)``: ``sloth generate --json``'s record."""

    def run(model, prompt: str, *flags: str) -> dict:
        # On the CPU, as the in-process models the tests compare with (on a GPU machine
        # too: `auto` would load onto the GPU in bf16).
        flags = ("--device", "cpu", *flags) if "--device" not in flags else flags
        status, out, err = sloth("generate", model, "--prompt", prompt, "--json", *flags)
        assert status == 0, err
        return json.loads(out)

    return run
