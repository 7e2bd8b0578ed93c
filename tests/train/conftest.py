"""Shared pieces of the trainer tests: a tiny model on disk and a small data file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sloth_core.testing.datasets import load_tiny_instructions


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch):
    # These tests are about the loop, not the kernels: under CI's TRITON_INTERPRET=1 the
    # kernels would run interpreted (minutes); a user's CPU runs the references anyway.
    monkeypatch.setenv("SLOTH_KERNELS", "torch")


@pytest.fixture(autouse=True)
def _single_thread(single_thread):
    """Every test here on one torch thread (the fixture of sloth's pytest plugin)."""


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from sloth_core.testing.models import tiny_model

    return tiny_model("llama", tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory) -> Path:
    """The demo's base model, built once for the session's preference and GRPO runs."""
    from sloth_core.train.demo import demo_model

    return demo_model(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    rows = load_tiny_instructions()[:48]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
