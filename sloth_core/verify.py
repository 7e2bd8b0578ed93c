"""``sloth export --verify``: reload what was written and compare it with the model in memory.

Each format brings its own verifier (:attr:`ExportFormat.verify
<sloth_core.formats.ExportFormat.verify>`), built from the helpers here: safetensors
exports (``merged_16bit``, sloth-bnb's ``merged_4bit``) reload through transformers
(:func:`verify_safetensors`), sloth-gguf's files through llama.cpp, a LoRA adapter
directory is compared tensor by tensor (:func:`verify_lora`). For models, the
logits of every position of a few sample prompts (so every next-token prediction) are
compared with the in-memory model's:

- **max abs**: the largest absolute difference of any logit;
- **max rel**: max abs divided by the largest absolute reference logit;
- **top-1**: the share of positions whose most likely next token agrees, over every
  position and over the *confident* ones, where the in-memory model gives its most likely
  token a probability of at least :data:`CONFIDENT` (an answer, not a guess);
- **KL divergence**: the mean over positions of KL(in memory || export), in nats, the
  figure llama.cpp's ``perplexity --kl-divergence`` reports for its quantization types.

Each weight type has a tolerance, declared with it by the format's plugin
(:class:`~sloth_core.formats.WeightType`; the float types are
:data:`~sloth_core.formats.FLOAT_TYPES`): a bound on max rel (16 and 8 bits) and a least
top-1 agreement, judged on the confident positions when there are at least
:data:`MIN_CONFIDENT` of them, else on all. Where a model hesitates between tokens whose
probabilities are within a rounding error of each other, its top-1 is a coin toss that any
export may flip: llama.cpp measures 92% to 95% same top-1 over every Wikitext position for
Llama 2 7B and Llama 3 8B at q4_k_m (mean KL divergence 0.013 and 0.031), and a fine-tune
asked about anything outside its task hesitates at most positions. What a user needs kept
are the answers the model is sure of. The exported tokenizer must also encode sample texts
(special tokens and a chat-templated conversation included) to the same ids as the
in-memory one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sloth_core.formats import UNKNOWN_TOLERANCE, ExportFormat, Tolerance

__all__ = [
    "CONFIDENT",
    "MIN_CONFIDENT",
    "SAMPLE_PROMPTS",
    "SAMPLE_TEXTS",
    "Tolerance",
    "VerifyLevel",
    "VerifyReport",
    "VerifyRequest",
    "compare_logits",
    "compare_token_ids",
    "model_logits",
    "print_report",
    "verify_export",
    "verify_lora",
    "verify_safetensors",
]


#: A position is confident where the in-memory model gives its most likely next token at
#: least this probability: more than all the other tokens together.
CONFIDENT = 0.5
#: Fewer confident positions than this and top-1 agreement is judged on every position.
MIN_CONFIDENT = 10

SAMPLE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 4, 5, 6,",
)
SAMPLE_TEXTS = (
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "  leading spaces,\ttabs\nand\n\nnew lines  ",
    "unicode: café, naïve, Straße, 日本語, emoji 🦥",
)
_CONVERSATION = (
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
)


@dataclass
class VerifyLevel:
    """One way a verifier reloaded the export (GGUF: the gguf package, then llama.cpp).

    ``status``: ``"passed"``, ``"failed"`` or ``"not run"``; ``detail``: its figures, or
    why it did not run (with what to install).
    """

    name: str
    status: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.name}: {self.status}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class VerifyReport:
    """What :func:`verify_export` compared, and what went wrong (``problems``).

    ``levels``: for a verifier that reloads the export more than one way, each way and
    whether it ran and passed (the figures above are the strongest level's that ran).
    """

    path: Path
    kind: str  # what was reloaded: "safetensors", "gguf", "lora", ... (the verifier's word)
    weight_type: str
    tolerance: Tolerance
    positions: int = 0
    max_abs: float | None = None
    max_rel: float | None = None
    top1: float | None = None  # over every position
    confident: int = 0  # positions where the reference is confident (see CONFIDENT)
    top1_confident: float | None = None
    kl_divergence: float | None = None  # mean KL(reference || export), nats
    texts: int = 0
    texts_matching: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    levels: list[VerifyLevel] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


# -- the request ------------------------------------------------------------------------------
@dataclass
class VerifyRequest:
    """What a format's verifier is asked to check: the export at ``path`` against ``model``.

    ``quantization``: the weight type asked for at export (``None``: the verifier reads it
    from what was written); ``runner``: an engine to reload with, for tests (the GGUF
    verifier takes a llama.cpp runner).
    """

    format: ExportFormat
    path: Path
    model: Any
    tokenizer: Any
    quantization: str | None = None
    prompts: tuple[str, ...] = SAMPLE_PROMPTS
    runner: Any = None

    def report(self, kind: str, weight_type: str | None, *, logits: bool = True) -> VerifyReport:
        """An empty report for ``weight_type``, with the tolerance the format declares for it
        (``logits=False``: a check that compares no logits, so needs none)."""
        declared = self.format.weight_type(weight_type)
        name = declared.name if declared else (weight_type or "unknown").lower()
        tolerance = declared.tolerance if declared else UNKNOWN_TOLERANCE
        report = VerifyReport(path=self.path, kind=kind, weight_type=name, tolerance=tolerance)
        if logits and (declared is None or declared.tolerance is UNKNOWN_TOLERANCE):
            report.notes.append(
                f"no tolerance declared for type {name!r}: judged by top-1 agreement alone"
            )
        return report


# -- the model in memory ------------------------------------------------------------------
def _prompt_ids(tokenizer: Any, prompts: tuple[str, ...], vocab: int) -> list[list[int]]:
    # The prompts as the model sees them: plain text with the bos the tokenizer adds, the
    # conversation as its chat template writes it (bos included where the template has one).
    texts = [(text, True) for text in prompts]
    chat = _chat_text(tokenizer, add_generation_prompt=True)
    if chat:
        texts.append((chat, False))
    lists = []
    for text, special in texts:
        ids = [int(i) for i in tokenizer(text, add_special_tokens=special).input_ids]
        lists.append([i for i in ids if i < vocab] or [0])
    return lists


def _chat_text(tokenizer: Any, *, add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        return ""
    try:
        return tokenizer.apply_chat_template(
            list(_CONVERSATION), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception:  # a template that refuses this conversation: texts without it
        return ""


def _all_logits(model: Any, lists: list[list[int]]) -> list[np.ndarray]:
    import torch

    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [
                model(torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()
                for ids in lists
            ]
    finally:
        model.train(training)


def model_logits(model: Any, lists: list[list[int]]) -> list[np.ndarray]:
    """The every-position logits of ``model`` (a transformers causal LM) for each id list,
    in float32 on the CPU: what :func:`compare_logits` takes from a reloaded export."""
    return _all_logits(model, lists)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _compare(report: VerifyReport, reference: list[np.ndarray], exported: list[np.ndarray]) -> None:
    width = min(reference[0].shape[-1], exported[0].shape[-1])
    if reference[0].shape[-1] != exported[0].shape[-1]:
        report.notes.append(
            f"vocabulary widths differ ({reference[0].shape[-1]} in memory, "
            f"{exported[0].shape[-1]} exported): the first {width} logits are compared"
        )
    max_abs = scale = kl = 0.0
    agree = positions = confident = agree_confident = 0
    for ref, out in zip(reference, exported, strict=True):
        ref, out = ref[:, :width].astype(np.float64), out[:, :width].astype(np.float64)
        if ref.shape != out.shape:
            report.problems.append(f"logits of shape {out.shape} for a prompt of {ref.shape}")
            return
        max_abs = max(max_abs, float(np.abs(ref - out).max()))
        scale = max(scale, float(np.abs(ref).max()))
        same = ref.argmax(-1) == out.argmax(-1)
        log_p, log_q = _log_softmax(ref), _log_softmax(out)
        sure = np.exp(log_p.max(-1)) >= CONFIDENT
        agree += int(same.sum())
        agree_confident += int(same[sure].sum())
        confident += int(sure.sum())
        kl += float((np.exp(log_p) * (log_p - log_q)).sum())
        positions += ref.shape[0]
    report.positions, report.max_abs, report.top1 = positions, max_abs, agree / positions
    report.confident = confident
    report.top1_confident = agree_confident / confident if confident else None
    report.kl_divergence = kl / positions
    report.max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf)
    tol = report.tolerance
    if not math.isfinite(max_abs):
        report.problems.append("the exported model's logits are not finite")
    elif tol.max_rel is not None and report.max_rel > tol.max_rel:
        report.problems.append(
            f"max relative logit error {report.max_rel:.3g} > {tol.max_rel:g} allowed for "
            f"{report.weight_type}"
        )
    if confident >= MIN_CONFIDENT:
        top1, where = report.top1_confident, f"the {confident} confident positions"
    else:
        top1, where = report.top1, "every position"
        report.notes.append(
            f"the model is confident (p >= {CONFIDENT:g}) at only {confident} of "
            f"{positions} positions: top-1 agreement is judged on every position"
        )
    assert top1 is not None  # both set above (confident > 0 in the first case)
    if top1 < tol.min_top1:
        report.problems.append(
            f"top-1 agreement {top1:.1%} on {where} < {tol.min_top1:.0%} required for "
            f"{report.weight_type}"
        )


def _compare_ids(report: VerifyReport, texts: list[str], expected: list, got: list) -> None:
    report.texts = len(texts)
    report.texts_matching = sum(a == b for a, b in zip(expected, got, strict=True))
    for text, a, b in zip(texts, expected, got, strict=True):
        if a != b:
            report.problems.append(
                f"the exported tokenizer encodes {text[:40]!r} as {b[:12]}... not {a[:12]}..."
            )
            break


def _texts(tokenizer: Any) -> list[str]:
    chat = _chat_text(tokenizer)
    return [*SAMPLE_TEXTS, *([chat] if chat else [])]


def compare_logits(
    report: VerifyReport,
    model: Any,
    tokenizer: Any,
    prompts: tuple[str, ...],
    exported_logits: Callable[[list[list[int]]], list[np.ndarray]],
) -> None:
    """Compare the every-position logits of ``prompts`` (and a chat-templated conversation)
    from ``model`` with those ``exported_logits(id_lists)`` gives, into ``report``."""
    vocab = int(model.get_output_embeddings().weight.shape[0])
    lists = _prompt_ids(tokenizer, prompts, vocab)
    _compare(report, _all_logits(model, lists), exported_logits(lists))


def compare_token_ids(
    report: VerifyReport, tokenizer: Any, encode: Callable[[list[str]], list[list[int]]]
) -> None:
    """The sample texts (and a chat-templated conversation) encode to the same ids through
    ``tokenizer`` and through the export's ``encode``."""
    texts = _texts(tokenizer)
    _compare_ids(
        report,
        texts,
        [list(tokenizer(t).input_ids) for t in texts],
        [list(i) for i in encode(texts)],
    )


# -- the built-in verifiers ---------------------------------------------------------------------
def _safetensors_type(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    if quant:
        if quant.get("load_in_8bit"):
            return "int8"
        return str(quant.get("bnb_4bit_quant_type") or quant.get("quant_method") or "unknown")
    return str(config.get("dtype") or config.get("torch_dtype") or "unknown")


def verify_safetensors(request: VerifyRequest) -> VerifyReport:
    """A model directory transformers loads (its weight type from ``config.json``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model = request.path, request.model
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: nothing to verify (no config.json)")
    report = request.report("safetensors", _safetensors_type(path))
    device = next(model.parameters()).device

    def reloaded_logits(lists: list[list[int]]) -> list[np.ndarray]:
        # Eager attention: the plainest path, and the only one that honours every softcap.
        reloaded = AutoModelForCausalLM.from_pretrained(
            path,
            dtype="auto",
            attn_implementation="eager",
            device_map=str(device),
            trust_remote_code=False,  # our own export: nothing in it is code to run
        )
        try:
            return _all_logits(reloaded, lists)
        finally:
            del reloaded

    compare_logits(report, model, request.tokenizer, request.prompts, reloaded_logits)
    if request.tokenizer is not None:
        _verify_hf_tokenizer(
            report, request.tokenizer, AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        )
    return report


def _verify_hf_tokenizer(report: VerifyReport, tokenizer: Any, exported: Any) -> None:
    compare_token_ids(report, tokenizer, lambda texts: [exported(t).input_ids for t in texts])
    if getattr(tokenizer, "chat_template", None) != getattr(exported, "chat_template", None):
        report.problems.append("the exported tokenizer's chat template differs")


def verify_lora(request: VerifyRequest) -> VerifyReport:
    """A PEFT adapter directory: every saved tensor equals the one in memory."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    path, model, tokenizer = request.path, request.model, request.tokenizer
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: nothing to verify (no adapter_config.json)")
    report = request.report("lora", "adapter", logits=False)
    files = sorted(path.glob("adapter_model*.safetensors"))
    if not files or not hasattr(model, "peft_config"):
        report.problems.append("no adapter_model.safetensors, or the model has no LoRA adapter")
        return report
    saved = {k: v for f in files for k, v in load_file(str(f)).items()}
    current = get_peft_model_state_dict(model)
    if set(saved) != set(current):
        report.problems.append(
            f"adapter tensors differ: {len(saved)} saved, {len(current)} in memory"
        )
        return report
    report.positions = len(saved)
    report.max_abs = max(
        (float((saved[k].float() - current[k].detach().float().cpu()).abs().max()) for k in saved),
        default=0.0,
    )
    report.max_rel, report.top1 = None, None
    if report.max_abs > 0:
        report.problems.append(f"saved adapter tensors differ by up to {report.max_abs:.3g}")
    if tokenizer is not None and (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        _verify_hf_tokenizer(
            report, tokenizer, AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        )
    return report


def verify_export(
    path: str | Path,
    model: Any,
    tokenizer: Any,
    *,
    format: str,
    quantization: str | None = None,
    prompts: tuple[str, ...] = SAMPLE_PROMPTS,
    runner: Any = None,
    manager: Any = None,
) -> VerifyReport:
    """Reload the ``format`` export at ``path`` and compare it with ``model`` and ``tokenizer``,
    through the verifier the format's plugin declared.

    Args:
        path: what ``sloth_core.export`` wrote (a directory or a file).
        model: the in-memory model it was written from (PEFT-wrapped or plain).
        tokenizer: its tokenizer.
        format: the export format (or an alias) it was written in.
        quantization: the weight type asked for (read from what was written when ``None``).
        prompts: texts whose every-position logits are compared (plus a chat-templated
            conversation when the tokenizer has a template).
        runner: the engine the verifier reloads with, where it takes one (tests).
        manager: the plugin manager that knows ``format`` (the process's by default).

    Returns:
        The report; ``report.passed`` is false past the type's tolerance.
    """
    from sloth_core.errors import PluginMissingError

    if manager is None:
        from sloth_core.plugins import get_plugin_manager

        manager = get_plugin_manager()
    declared = manager.export_format(format)
    if declared is None:
        raise PluginMissingError(f"no installed plugin serves the export format {format!r}")
    request = VerifyRequest(
        declared, Path(path), model, tokenizer, quantization, tuple(prompts), runner
    )
    if declared.verify is None:
        report = request.report(declared.name, quantization)
        report.problems.append(
            f"the {declared.name} format ({declared.plugin}) declares no verifier: "
            "the export is not verified"
        )
        return report
    return declared.verify(request)


def print_report(report: VerifyReport, console: Any = None) -> None:
    """Print ``report`` as a table (rich), with its verdict."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    tol = report.tolerance
    table = Table(title=f"verify {report.path} ({report.kind}, {report.weight_type})")
    for column in ("check", "measured", "allowed"):
        table.add_column(column)

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    if report.kind == "lora":
        table.add_row("adapter tensors", str(report.positions), "")
        table.add_row("max abs difference", fmt(report.max_abs, ".3g"), "0")
    else:
        judged_confident = report.confident >= MIN_CONFIDENT
        need = f">= {tol.min_top1:.0%}"
        table.add_row("positions compared", str(report.positions), "")
        table.add_row("max abs logit error", fmt(report.max_abs, ".4g"), "")
        allowed = "reported only" if tol.max_rel is None else f"<= {tol.max_rel:g}"
        table.add_row("max rel logit error", fmt(report.max_rel, ".4g"), allowed)
        table.add_row("mean KL divergence", fmt(report.kl_divergence, ".3g"), "reported only")
        table.add_row(
            "top-1 agreement, all positions",
            fmt(report.top1, ".1%"),
            "reported only" if judged_confident else need,
        )
        table.add_row(
            f"top-1 agreement, {report.confident} confident positions",
            fmt(report.top1_confident, ".1%"),
            need if judged_confident else f"judged at >= {MIN_CONFIDENT} positions",
        )
    if report.texts:
        table.add_row(
            "tokenizer: same ids", f"{report.texts_matching}/{report.texts}", f"{report.texts}"
        )
    console.print(table)
    # Escaped: an install command's extra (`sloth-gguf[llama-cpp]`) is not rich markup.
    if report.levels:
        console.print("levels: " + escape("; ".join(str(level) for level in report.levels)))
    for note in report.notes:
        console.print(f"note: {escape(note)}")
    for problem in report.problems:
        console.print(f"[bold red]FAIL[/]: {escape(problem)}")
    if report.passed:
        console.print("[green]verified[/]: the export matches the model in memory")
