"""Docs that cannot rot: hook signatures, ops and the README's commands are checked."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from sloth_core import hookspecs
from sloth_core.ops import REFERENCE_OPS

ROOT = Path(__file__).resolve().parents[1]


class _Raw(str):
    """An annotation string that prints without quotes, as the source spells it."""

    def __repr__(self) -> str:
        return str(self)


def _signature(function) -> str:
    """``def name(params) -> ret`` as written in the source (annotations unquoted)."""
    sig = inspect.signature(function)
    params = [
        p.replace(annotation=_Raw(p.annotation)) if isinstance(p.annotation, str) else p
        for p in sig.parameters.values()
    ]
    ret = sig.return_annotation
    sig = sig.replace(
        parameters=params, return_annotation=_Raw(ret) if isinstance(ret, str) else ret
    )
    return f"def {function.__name__}{sig}"


def test_every_hook_is_documented_with_its_exact_signature():
    text = (ROOT / "docs" / "hooks.md").read_text()
    hooks = [f for _, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(f, "sloth_spec")]  # fmt: skip
    assert len(hooks) >= 9
    for hook in hooks:
        assert _signature(hook) in text, f"docs/hooks.md lacks `{_signature(hook)}`"
        heading = f"### {hook.__name__}" + (
            " (firstresult)" if hook.sloth_spec["firstresult"] else ""
        )
        assert heading in text, f"docs/hooks.md lacks heading {heading!r}"


def test_every_op_is_documented_with_its_exact_signature():
    text = (ROOT / "docs" / "ops.md").read_text()
    for name, fn in REFERENCE_OPS.items():
        assert f"## {name}" in text, f"docs/ops.md has no section for op {name}"
        assert _signature(fn) in text, f"docs/ops.md lacks `{_signature(fn)}`"


def test_readme_gives_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme.split("## Get started")[1], re.S)
    commands = commands[:2]
    assert len(commands) == 2, "README's 'Get started' must open with two command blocks"
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].strip() in ci, ".ci/run must call the README's test command"
