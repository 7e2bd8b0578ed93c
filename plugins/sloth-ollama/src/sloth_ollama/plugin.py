"""Hook implementations of sloth-ollama; the entry point names this module.

The ``ollama`` format is a directory with ``model.gguf`` and a ``Modelfile``. The GGUF
comes from whichever plugin serves ``gguf`` (sloth-gguf), through the core's ``export``
hook: plugins never import each other. The Modelfile is built, and its template checked
against the chat template, before anything is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sloth_core import hookimpl
from sloth_core.sdk import (
    ExportResult,
    PluginMissingError,
    SlothError,
    atomic_directory,
    install_command,
)

from .modelfile import GGUF_NAME, build_modelfile

PLUGIN = "sloth-ollama"
FORMAT = "ollama"
GGUF_FORMAT = "gguf"


@hookimpl
def register_exporters(register):
    """Declare the ``ollama`` format."""
    register(
        FORMAT,
        description="a directory for `ollama create`: the GGUF (through the gguf format; "
        "option quantization) and a Modelfile with the chat template in Go syntax, stop "
        "tokens, default system prompt and parameters",
        wraps="gguf",
    )


def export_ollama(model, tokenizer, path, options, host) -> ExportResult:
    """Write ``path/model.gguf`` (through ``host``'s gguf exporter) and ``path/Modelfile``.

    Options: those of the gguf format (``quantization``, ...) and of
    :func:`~sloth_ollama.modelfile.build_modelfile` (``chat_template``, ``system``,
    ``temperature``, ``top_p``, ``num_ctx``), and ``force``.
    """
    if GGUF_FORMAT not in host.exporters:
        raise PluginMissingError(
            "format 'ollama' writes its model through the 'gguf' format, which no installed "
            f"plugin serves: `{install_command('sloth-gguf')}`"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modelfile = build_modelfile(
        tokenizer,
        base.config,
        generation_config=getattr(base, "generation_config", None),
        options=options,
        gguf_name=GGUF_NAME,
    )
    gguf_options = {k: v for k, v in options.items() if k != "force"}
    with atomic_directory(path, force=options.get("force", False)) as staging:
        target = staging / GGUF_NAME
        result = host.export(
            model=model, tokenizer=tokenizer, format=GGUF_FORMAT, path=target,
            options={**gguf_options, "force": False},
        )  # fmt: skip
        if result is None:
            raise PluginMissingError(
                f"no plugin wrote the 'gguf' format: `{install_command('sloth-gguf')}`"
            )
        if not target.is_file():  # an exporter that wrote a directory: take its GGUF
            written = sorted(Path(result.path).rglob("*.gguf"))
            if not written:
                raise SlothError(f"the gguf exporter wrote no .gguf file under {result.path}")
            shutil.move(str(written[0]), target)
            if Path(result.path).is_dir():
                shutil.rmtree(result.path)
        (staging / "Modelfile").write_text(modelfile.text, encoding="utf-8")
    return ExportResult(FORMAT, Path(path), sorted(Path(path).iterdir()))


@hookimpl
def export(model, tokenizer, format, path, options, host):
    """Write the ``ollama`` directory; ``None`` for other formats."""
    if format != FORMAT:
        return None
    return export_ollama(model, tokenizer, path, options, host)
