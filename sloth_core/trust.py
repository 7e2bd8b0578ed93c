"""What sloth refuses to run unless told to: a model folder's own Python code.

transformers runs a model's code when its ``config.json`` or ``tokenizer_config.json`` maps
a class to a module of the folder (``auto_map``) and ``trust_remote_code`` is true; left
unset, it asks on the terminal, where one "y" runs the folder's code. sloth always passes
an explicit value, and refuses such folders up front, naming the file, before anything
loads or is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from sloth_core.errors import UntrustedCodeError

#: The files in which a model folder can ask for its own code.
_CODE_MAPS = ("config.json", "tokenizer_config.json", "processor_config.json")


def custom_code(directory: str | Path) -> dict[str, list[str]]:
    """The modules each file of ``directory`` would import (its ``auto_map`` values)."""
    found: dict[str, list[str]] = {}
    for name in _CODE_MAPS:
        path = Path(directory) / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # missing or broken: the loader reports that in its own words
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            values = auto_map.values() if isinstance(auto_map, dict) else auto_map
            flat = [v for item in values for v in (item if isinstance(item, list) else [item])]
            found[name] = sorted({str(v) for v in flat if v})
    return found


def check_remote_code(model_name: str | Path, trust_remote_code: bool) -> None:
    """Raise :class:`UntrustedCodeError` if the local model ``model_name`` needs its own
    code and ``trust_remote_code`` is not set."""
    directory = Path(model_name).expanduser()
    if trust_remote_code or not directory.is_dir():
        return
    found = custom_code(directory)
    if found:
        where = "; ".join(f"{name} maps to {', '.join(mods)}" for name, mods in found.items())
        raise UntrustedCodeError(
            f"{directory} asks to run Python code of its own ({where}); sloth runs no model "
            "code unless told to. If you trust its source, pass --trust-remote-code "
            "(trust_remote_code=True in Python)"
        )
