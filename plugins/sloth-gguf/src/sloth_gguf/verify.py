"""``--verify`` for GGUF: reload the file in llama.cpp (a child process) and compare its
logits and token ids with the model in memory, by the core's rules
(:mod:`sloth_core.sdk`'s ``compare_logits``, ``compare_token_ids``)."""

from __future__ import annotations

from pathlib import Path

from sloth_core.sdk import VerifyReport, VerifyRequest, compare_logits, compare_token_ids

#: What ``--verify`` needs besides this plugin.
NEEDS = "pip install 'sloth-gguf[llama-cpp]' (llama-cpp-python)"


def find_gguf(path: Path) -> Path | None:
    """``path`` itself, or the first ``.gguf`` file in the directory ``path`` (Ollama's)."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        return found[0] if found else None
    return None


def file_type(path: Path) -> str:
    """The GGUF's ``general.file_type`` (``MOSTLY_Q4_K_M`` -> ``q4_k_m``), if readable."""
    try:
        from gguf import GGUFReader, LlamaFileType

        field_ = GGUFReader(str(path)).fields.get("general.file_type")
        if field_ is None:
            return "unknown"
        value = int(field_.parts[field_.data[0]][0])
        return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
    except Exception:  # no such field: the caller's word is all there is
        return "unknown"


def verify_gguf(request: VerifyRequest) -> VerifyReport:
    """Verify the GGUF at ``request.path`` (a file, or a directory holding one)."""
    gguf = find_gguf(request.path)
    if gguf is None:
        raise FileNotFoundError(f"{request.path}: nothing to verify (no .gguf file)")
    report = request.report("gguf", request.quantization or file_type(gguf))
    runner = request.runner
    if runner is None:
        from sloth_core.sdk import llama_cpp as runner
    if not runner.available():
        report.problems.append(
            f"llama.cpp is not installed here ({NEEDS}): the GGUF could not be reloaded, so "
            "it is not verified"
        )
        return report
    compare_logits(
        report, request.model, request.tokenizer, request.prompts,
        lambda lists: runner.run_logits(gguf, lists, n_ctx=512),
    )  # fmt: skip
    if request.tokenizer is not None:
        compare_token_ids(report, request.tokenizer, lambda texts: runner.run_tokenize(gguf, texts))
    return report
