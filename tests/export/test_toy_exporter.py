"""A format from a third party, with zero core edits: tests/fixtures/sloth-toyexport is
pip-installed into a temporary directory and used through ``PYTHONPATH`` in a child
process. Its declaration alone must reach ``sloth export --help``, ``sloth plugins list``,
``sloth train``'s option checks, the free-space check and ``--verify``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _dists import install_into

FIXTURE = Path(__file__).parents[1] / "fixtures" / "sloth-toyexport"

#: Runs in the child: the CLI and the API as a user would call them, results as JSON.
SCRIPT = r"""
import contextlib, io, json, sys
from pathlib import Path

import sloth_core.io
from sloth_core.cli import main
from sloth_core.formats import estimate_export_bytes
from sloth_core.plugins import get_plugin_manager
from sloth_core.errors import SlothError

model_dir, data, work = map(Path, sys.argv[1:4])
out = {}

def cli(*args):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
    return {"code": code, "out": stdout.getvalue(), "err": stderr.getvalue()}

out["help"] = cli("export", "--help")
out["list"] = cli("plugins", "list", "--json")
out["export"] = cli("export", str(model_dir), "--format", "toy", "-q", "full",
                    "--output", str(work / "toy-out"), "--verify")
out["files"] = sorted(p.name for p in (work / "toy-out").iterdir())
train = ["train", "--model-name", str(model_dir), "--dataset", str(data), "--report-to", "none",
         "--max-steps", "1", "--export-format", "toy"]
out["train_bad"] = cli(*train, "--output-dir", str(work / "t1"), "--export-quantization", "t8")
out["train_dirs"] = sorted(p.name for p in work.iterdir())

# The free-space check sizes the export by the type's declared bytes per weight.
from sloth_core.api import load_model
from sloth_core.types import ModelSpec
model, tokenizer, _ = load_model(ModelSpec(model_name=str(model_dir)))
declared = get_plugin_manager().export_format("toy")
weights = sum(p.numel() for p in model.parameters())
out["estimate"] = {q: estimate_export_bytes(model, declared, {"quantization": q}) / weights
                   for q in ("t16", "t32")}
sloth_core.io.free_bytes = lambda path: int(weights * 3)  # room for t16, not for t32
import sloth_core
results = {}
for q in ("half", "t32"):
    try:
        sloth_core.export(model, tokenizer, work / f"space-{q}", format="toy", quantization=q)
        results[q] = "written"
    except SlothError as exc:
        results[q] = str(exc)
out["space"] = results
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return install_into(tmp_path_factory.mktemp("site"), FIXTURE)


def test_a_third_party_format_needs_no_core_edit(site, make_tiny_model, tmp_path):
    model_dir = make_tiny_model("llama")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(8)))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_dir), str(data), str(work)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    # sloth export --help and sloth plugins list show it, with its weight types.
    help_text = " ".join(out["help"]["out"].split())
    assert "toy, toy-format (quantization: t16, t32; default t16) [sloth-toyexport]" in help_text
    records = {r["name"]: r for r in json.loads(out["list"]["out"])}
    toy = records["sloth-toyexport"]["formats"]["toy"]
    assert toy["quantizations"] == ["t16", "t32"] and toy["default_quantization"] == "t16"
    assert toy["aliases"] == ["toy-format"] and toy["verifies"]

    # sloth export --verify runs its verifier, judged by its declared tolerance.
    export = out["export"]
    assert export["code"] == 0, export["err"] + export["out"]
    printed = export["err"] + export["out"]
    assert "checked by the toy format's own verifier" in printed and "verified" in printed
    assert "toy.json" in out["files"] and "config.json" in out["files"]

    # sloth train checks the export's options against the declaration before any work.
    bad = out["train_bad"]
    assert bad["code"] != 0
    assert "export_quantization='t8'" in bad["err"] and "t16, t32" in bad["err"]
    assert out["train_dirs"] == ["toy-out"]  # nothing written for the refused run

    # The free-space check uses the declared bytes per weight (2 and 4).
    assert out["estimate"] == {"t16": 2.0, "t32": 4.0}
    assert out["space"]["half"] == "written"
    assert "not enough free disk space" in out["space"]["t32"]
