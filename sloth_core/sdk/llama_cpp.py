"""llama.cpp, through the ``llama-cpp-python`` package, always in a child process.

llama.cpp aborts the whole process on some errors (a bad tensor, an unsupported type), so
nothing here loads it in the caller's process: every function starts
``python -m sloth_core.sdk.llama_cpp_worker``, sends it one JSON request on stdin and
reads one JSON answer on stdout (logits come back as ``.npy`` files in a temporary
directory). When the child fails, dies or times out, :class:`LlamaCppError` carries the
tail of llama.cpp's stderr.

Threads: ``SLOTH_LLAMA_CPP_THREADS`` (default: the CPU count, at most 8). Set
``SLOTH_LLAMA_CPP_VERBOSE=1`` to keep llama.cpp's informational log in the error text.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sloth_core.errors import SlothError

__all__ = [
    "PACKAGE",
    "LlamaCppError",
    "LlamaCppMissingError",
    "available",
    "quantize",
    "run_generate",
    "run_logits",
    "run_tokenize",
]

#: The distribution that provides llama.cpp's Python bindings.
PACKAGE = "llama-cpp-python"
WORKER = "sloth_core.sdk.llama_cpp_worker"
#: How much of llama.cpp's stderr an error message keeps (its end).
STDERR_TAIL = 4000


class LlamaCppError(SlothError):
    """llama.cpp failed, crashed or timed out in its child process."""

    def __init__(self, message: str, stderr: str = "") -> None:
        self.stderr = stderr
        tail = stderr[-STDERR_TAIL:].strip()
        super().__init__(f"{message}\n--- llama.cpp stderr ---\n{tail}" if tail else message)


class LlamaCppMissingError(SlothError):
    """``llama-cpp-python`` is not installed in this Python environment."""


def available() -> bool:
    """Whether ``llama-cpp-python`` is installed (checked without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _require() -> None:
    if not available():
        raise LlamaCppMissingError(
            f"this needs llama.cpp's Python bindings: `pip install {PACKAGE}` "
            f'(build it with CMAKE_ARGS="-DGGML_NATIVE=OFF" on machines where the native '
            f"build dies with an illegal instruction)"
        )


def _run(request: dict[str, Any], timeout: float) -> Any:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", WORKER],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise LlamaCppError(
            f"llama.cpp {request['op']} timed out after {timeout}s", stderr
        ) from None
    answer = None
    lines = proc.stdout.strip().splitlines()
    if lines:
        try:
            answer = json.loads(lines[-1])
        except json.JSONDecodeError:
            answer = None
    if answer is None:
        raise LlamaCppError(
            f"llama.cpp {request['op']} died (exit status {proc.returncode}) without an answer",
            proc.stderr,
        )
    if not answer.get("ok"):
        if answer.get("kind") == "missing":
            raise LlamaCppMissingError(f"{answer['error']}: `pip install {PACKAGE}`")
        raise LlamaCppError(f"llama.cpp {request['op']} failed: {answer['error']}", proc.stderr)
    return answer["result"]


def _model(path: str | os.PathLike[str]) -> str:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    return str(path)


def run_logits(
    gguf_path: str | os.PathLike[str],
    token_id_lists: Sequence[Sequence[int]],
    *,
    n_ctx: int = 512,
    timeout: float = 300,
) -> list[np.ndarray]:
    """The logits llama.cpp computes for every position of each token list.

    Each list is evaluated on its own, from an empty KV cache kept in float32 (``type_k``
    and ``type_v`` f32, flash attention off), in one batch: one child process for all.

    Args:
        gguf_path: the model file.
        token_id_lists: the prompts, as token ids (add the bos yourself if the model wants it).
        n_ctx: the context size; raised to the longest list if that is longer.
        timeout: seconds before the child is killed.

    Returns:
        One float32 array ``[len(list), n_vocab]`` per list, in order.
    """
    lists = [[int(t) for t in ids] for ids in token_id_lists]
    if any(not ids for ids in lists):
        raise ValueError("every token list needs at least one token")
    if not lists:
        return []
    _require()
    with tempfile.TemporaryDirectory(prefix="sloth-llama-logits-") as out_dir:
        result = _run(
            {
                "op": "logits",
                "model": _model(gguf_path),
                "token_lists": lists,
                "n_ctx": max(n_ctx, max(len(ids) for ids in lists)),
                "out_dir": out_dir,
            },
            timeout,
        )
        return [np.load(Path(out_dir) / name) for name in result["files"]]


def run_tokenize(
    gguf_path: str | os.PathLike[str],
    texts: Sequence[str],
    *,
    add_special: bool = True,
    parse_special: bool = True,
    timeout: float = 300,
) -> list[list[int]]:
    """Token ids of each text by the GGUF file's own tokenizer (the vocabulary alone loads).

    ``add_special`` adds the bos/eos the file asks for (``tokenizer.ggml.add_bos_token``...);
    ``parse_special`` turns special-token text such as ``<|im_start|>`` into its id.
    """
    _require()
    return _run(
        {
            "op": "tokenize",
            "model": _model(gguf_path),
            "texts": list(texts),
            "add_special": add_special,
            "parse_special": parse_special,
        },
        timeout,
    )


def run_generate(
    gguf_path: str | os.PathLike[str],
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    n_ctx: int | None = None,
    timeout: float = 300,
) -> list[int]:
    """Greedy continuation of ``prompt_ids``: the new token ids only.

    Stops after ``max_new_tokens`` or after the first token in ``stop_ids``, which is
    included at the end (as ``transformers``' ``generate`` includes the eos).
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("prompt_ids is empty")
    _require()
    return _run(
        {
            "op": "generate",
            "model": _model(gguf_path),
            "prompt_ids": prompt,
            "max_new_tokens": int(max_new_tokens),
            "stop_ids": [int(t) for t in stop_ids],
            "n_ctx": max(n_ctx or 0, len(prompt) + int(max_new_tokens)),
        },
        timeout,
    )


def quantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    qtype: str,
    *,
    timeout: float = 3600,
) -> Path:
    """Quantize GGUF ``src`` (f32/f16/bf16) into ``dst`` with ``llama_model_quantize``.

    ``qtype`` is a llama.cpp file type name, case-insensitive: ``q4_k_m``, ``q5_k_m``,
    ``q6_k``, ``q2_k``, ``q3_k_m``, ``q8_0``, ... (``LLAMA_FTYPE_MOSTLY_<NAME>``). Tensors
    whose rows do not fit the type's block size get llama.cpp's fallback type.
    """
    _require()
    dst = Path(dst).expanduser().resolve()
    _run(
        {"op": "quantize", "src": _model(src), "dst": str(dst), "qtype": qtype.lower()},
        timeout,
    )
    if not dst.is_file():
        raise LlamaCppError(f"llama.cpp quantize reported success but wrote no {dst}")
    return dst
