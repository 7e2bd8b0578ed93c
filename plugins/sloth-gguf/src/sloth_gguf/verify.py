"""``--verify`` for GGUF, in two levels, both compared with the model in memory by the
core's rules (:mod:`sloth_core.sdk`'s ``compare_logits``, ``compare_token_ids``):

1. **gguf-py reload**, always: the file read back with the ``gguf`` package, its metadata
   checked against the config and tokenizer, the model rebuilt from it in transformers
   (:mod:`.reload`). Needs nothing beyond this plugin.
2. **llama.cpp**, when ``llama-cpp-python`` is installed: the file loaded by llama.cpp
   itself (a child process), its logits and tokenizer. The stronger check: it runs the
   graph and kernels that will serve the file.

The export counts as verified when every level that ran passed; llama.cpp missing is a
note and a level marked "not installed", not a problem. The report's figures are the
strongest level's that ran; ``report.levels`` says which ran.
"""

from __future__ import annotations

from pathlib import Path

from sloth_core.sdk import (
    VerifyLevel,
    VerifyReport,
    VerifyRequest,
    compare_logits,
    compare_token_ids,
    install_command,
)

RELOAD, LLAMA_CPP = "gguf-py reload", "llama.cpp"
#: What the second, llama.cpp level needs besides this plugin.
NEEDS = (
    f"{install_command('sloth-gguf', 'llama-cpp')} (llama-cpp-python, a source build of "
    'several minutes; CMAKE_ARGS="-DGGML_NATIVE=OFF" where the native build dies with an '
    "illegal instruction)"
)


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


def figures(report: VerifyReport) -> str:
    """The headline figures of a level: max rel, top-1, tokenizer texts."""
    parts = []
    if report.max_rel is not None:
        parts.append(f"max rel {report.max_rel:.3g}")
    if report.top1 is not None:
        parts.append(f"top-1 {report.top1:.1%}")
    if report.texts:
        parts.append(f"tokenizer {report.texts_matching}/{report.texts} texts")
    return ", ".join(parts)


def _level(name: str, report: VerifyReport, detail: str) -> VerifyLevel:
    return VerifyLevel(name, "failed" if report.problems else "passed", detail)


def _merge(report: VerifyReport, other: VerifyReport, prefix: str) -> None:
    """``other``'s problems and notes into ``report`` (prefixed), its figures too."""
    report.problems.extend(f"{prefix}: {p}" for p in other.problems)
    report.notes.extend(f"{prefix}: {n}" for n in other.notes if n not in report.notes)
    for name in ("positions", "max_abs", "max_rel", "top1", "confident", "top1_confident",
                 "kl_divergence", "texts", "texts_matching"):  # fmt: skip
        setattr(report, name, getattr(other, name))


def _reload_level(request: VerifyRequest, gguf: Path, weight_type: str) -> VerifyReport:
    from .reload import check_reloaded  # torch and transformers only when verifying

    report = request.report("gguf", weight_type)
    try:
        check_reloaded(report, gguf, request.model, request.tokenizer, request.prompts)
    except Exception as exc:  # a failure of this level, reported; llama.cpp's still runs
        report.problems.append(f"the file could not be rebuilt: {type(exc).__name__}: {exc}")
    report.levels.append(_level(RELOAD, report, figures(report)))
    return report


def _llama_cpp_level(request: VerifyRequest, gguf: Path, weight_type: str, runner) -> VerifyReport:
    report = request.report("gguf", weight_type)
    compare_logits(
        report, request.model, request.tokenizer, request.prompts,
        lambda lists: runner.run_logits(gguf, lists, n_ctx=512),
    )  # fmt: skip
    if request.tokenizer is not None:
        compare_token_ids(report, request.tokenizer, lambda texts: runner.run_tokenize(gguf, texts))
    report.levels.append(_level(LLAMA_CPP, report, figures(report)))
    return report


def verify_gguf(request: VerifyRequest) -> VerifyReport:
    """Verify the GGUF at ``request.path`` (a file, or a directory holding one)."""
    gguf = find_gguf(request.path)
    if gguf is None:
        raise FileNotFoundError(f"{request.path}: nothing to verify (no .gguf file)")
    weight_type = request.quantization or file_type(gguf)
    first = _reload_level(request, gguf, weight_type)
    report = request.report("gguf", weight_type)
    _merge(report, first, RELOAD)
    report.levels = list(first.levels)
    runner = request.runner
    if runner is None:
        from sloth_core.sdk import llama_cpp as runner
    if not runner.available():
        report.levels.append(VerifyLevel(LLAMA_CPP, "not installed", NEEDS))
        report.notes.append(
            "llama.cpp did not run (not installed; see levels): the file was checked as the "
            "gguf package reads it, not as llama.cpp runs it"
        )
        return report
    second = _llama_cpp_level(request, gguf, weight_type, runner)
    _merge(report, second, LLAMA_CPP)
    report.levels.extend(second.levels)
    return report
