"""Entry-point discovery end to end: fixture distributions pip-installed, then listed.

The fixtures are installed into a temporary ``--target`` directory and used through
``PYTHONPATH`` in subprocesses, so the test environment itself is never changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _dists import install_into

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    dists = [FIXTURES / name for name in ("sloth-toyarch", "sloth-broken", "sloth-needy")]
    return install_into(tmp_path_factory.mktemp("site"), *dists)


def _run(site: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], env=environ, capture_output=True, text=True, timeout=300
    )


def test_plugins_list_shows_third_party_and_failed_plugins(site):
    done = _run(site, "-m", "sloth_core", "plugins", "list", "--json")
    assert done.returncode == 0, done.stderr
    records = {r["name"]: r for r in json.loads(done.stdout)}
    toy = records["sloth-toyarch"]
    assert toy["status"] == "active" and toy["version"] == "1.2.3"
    assert toy["architectures"] == ["sloth_toy"] and toy["kind"] == "architecture"
    assert toy["source"] == "entrypoint"
    broken = records["sloth-broken"]
    assert broken["status"] == "failed"
    assert (
        "import failed: ImportError: sloth_broken needs the library 'frobnicate'"
        in broken["reason"]
    )
    needy = records["sloth-needy"]
    assert needy["status"] == "failed"
    assert "surely-not-installed-lib>=9.9 (not installed)" in needy["reason"]
    assert "sloth: plugin 'sloth-broken' failed" in done.stderr


def test_disabled_plugin_is_listed_as_disabled(site):
    done = _run(site, "-m", "sloth_core", "plugins", "list", "--json",
                env={"SLOTH_DISABLE_PLUGINS": "sloth-broken"})  # fmt: skip
    records = {r["name"]: r for r in json.loads(done.stdout)}
    assert records["sloth-broken"]["status"] == "disabled"
    assert records["sloth-toyarch"]["status"] == "active"


TOY_LOAD = """
import json, sys
from sloth_core import FastLanguageModel
model, tokenizer = FastLanguageModel.from_pretrained(sys.argv[1], max_seq_length=64)
ids = tokenizer("hello there", return_tensors="pt").input_ids
print(json.dumps({"class": type(model).__name__, "model_type": model.config.model_type,
                  "logits": list(model(ids).logits.shape)}))
"""


def test_third_party_load_model_serves_its_own_model_type(site, make_tiny_model):
    path = make_tiny_model("llama")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "sloth_toy"  # a model type transformers does not know
    (path / "config.json").write_text(json.dumps(config))
    done = _run(site, "-c", TOY_LOAD, str(path))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["class"] == "ToyForCausalLM" and result["model_type"] == "sloth_toy"
    assert result["logits"][0] == 1 and result["logits"][2] == config["vocab_size"]
    # Without the plugin, the same directory is refused with a clear message.
    bare = _run(Path("/nonexistent"), "-c", TOY_LOAD, str(path))
    assert bare.returncode != 0 and "known model_type" in bare.stderr
