"""The child process of :mod:`sloth_core.sdk.llama_cpp`: one request, one answer.

Reads a JSON request on stdin, runs it through llama.cpp's C API (``llama_cpp``), and
writes one JSON line ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ...}``
on stdout. File descriptor 1 is pointed at stderr before llama.cpp loads, so nothing it
prints can corrupt the answer; if it aborts, the parent reports its stderr.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

# ggml's log levels (ggml.h): llama-cpp-python's own callback maps them off by one and
# drops the errors unless everything is printed, so the worker installs its own.
_WARN, _ERROR, _CONT = 3, 4, 5


def _install_log(L: Any, verbose: bool) -> Any:
    last = [0]

    @L.llama_log_callback
    def log(level: int, text: bytes, user_data: Any) -> None:
        shown = (
            verbose or level in (_WARN, _ERROR) or (level == _CONT and last[0] in (_WARN, _ERROR))
        )
        if level != _CONT:
            last[0] = level
        if shown:
            sys.stderr.write(text.decode("utf-8", errors="replace"))
            sys.stderr.flush()

    L.llama_log_set(log, ctypes.c_void_p(0))
    return log  # the caller keeps it alive: llama.cpp holds only the C pointer


def _threads() -> int:
    value = os.environ.get("SLOTH_LLAMA_CPP_THREADS")
    return int(value) if value else max(1, min(os.cpu_count() or 1, 8))


def _load(L: Any, path: str, *, vocab_only: bool = False) -> Any:
    params = L.llama_model_default_params()
    params.n_gpu_layers = 0  # the CPU gives the reference numbers
    params.vocab_only = vocab_only
    model = L.llama_model_load_from_file(path.encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    return model


def _context(L: Any, model: Any, n_ctx: int) -> Any:
    params = L.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_ctx  # a whole prompt in one decode
    params.n_ubatch = n_ctx
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = _threads()
    # A float32 KV cache and the plain attention path: the numbers stay float32 throughout.
    params.type_k = params.type_v = L.GGML_TYPE_F32
    params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.swa_full = True
    params.no_perf = True
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    return ctx


def _decode(L: Any, ctx: Any, batch: Any, tokens: list[int], start: int, all_logits: bool) -> None:
    batch.n_tokens = len(tokens)
    for i, token in enumerate(tokens):
        batch.token[i] = token
        batch.pos[i] = start + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = all_logits or i == len(tokens) - 1
    status = L.llama_decode(ctx, batch)
    if status != 0:
        raise RuntimeError(f"llama_decode returned {status}")


def _n_vocab(L: Any, model: Any) -> int:
    return L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))


def op_logits(L: Any, request: dict[str, Any]) -> dict[str, Any]:
    model = _load(L, request["model"])
    ctx = _context(L, model, int(request["n_ctx"]))
    n_vocab = _n_vocab(L, model)
    batch = L.llama_batch_init(int(request["n_ctx"]), 0, 1)
    files = []
    try:
        for index, tokens in enumerate(request["token_lists"]):
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            _decode(L, ctx, batch, tokens, 0, all_logits=True)
            pointer = L.llama_get_logits(ctx)
            logits = np.ctypeslib.as_array(pointer, shape=(len(tokens) * n_vocab,))
            name = f"logits_{index}.npy"
            np.save(Path(request["out_dir"]) / name, logits.reshape(len(tokens), n_vocab).copy())
            files.append(name)
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    return {"files": files, "n_vocab": n_vocab}


def op_tokenize(L: Any, request: dict[str, Any]) -> list[list[int]]:
    model = _load(L, request["model"], vocab_only=True)
    vocab = L.llama_model_get_vocab(model)
    out = []
    try:
        for text in request["texts"]:
            data = text.encode("utf-8")
            size = len(data) + 16
            for _ in range(2):
                buffer = (L.llama_token * size)()
                n = L.llama_tokenize(
                    vocab, data, len(data), buffer, size,
                    request["add_special"], request["parse_special"],
                )  # fmt: skip
                if n >= 0:
                    break
                size = -n  # the buffer was too small: n is minus the size needed
            if n < 0:
                raise RuntimeError(f"llama_tokenize failed ({n}) on {text[:40]!r}")
            out.append(list(buffer[:n]))
    finally:
        L.llama_model_free(model)
    return out


def op_generate(L: Any, request: dict[str, Any]) -> list[int]:
    model = _load(L, request["model"])
    n_ctx = int(request["n_ctx"])
    ctx = _context(L, model, n_ctx)
    n_vocab = _n_vocab(L, model)
    batch = L.llama_batch_init(n_ctx, 0, 1)
    stop = set(request["stop_ids"])
    new: list[int] = []
    try:
        tokens, position = list(request["prompt_ids"]), 0
        for _ in range(request["max_new_tokens"]):
            _decode(L, ctx, batch, tokens, position, all_logits=False)
            position += len(tokens)
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            token = int(np.argmax(logits))
            new.append(token)
            if token in stop:
                break
            tokens = [token]
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    return new


def op_quantize(L: Any, request: dict[str, Any]) -> dict[str, Any]:
    name = f"LLAMA_FTYPE_MOSTLY_{request['qtype'].upper()}"
    ftype = getattr(L, name, None)
    if ftype is None:
        known = sorted(k.removeprefix("LLAMA_FTYPE_MOSTLY_").lower()
                       for k in dir(L) if k.startswith("LLAMA_FTYPE_MOSTLY_"))  # fmt: skip
        raise ValueError(f"llama.cpp has no file type {request['qtype']!r}; it has {known}")
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = _threads()
    status = L.llama_model_quantize(
        request["src"].encode(), request["dst"].encode(), ctypes.byref(params)
    )
    if status != 0:
        raise RuntimeError(f"llama_model_quantize returned {status}")
    return {"ftype": ftype}


OPS = {
    "logits": op_logits,
    "tokenize": op_tokenize,
    "generate": op_generate,
    "quantize": op_quantize,
}


def main() -> int:
    answer_fd = os.dup(1)
    os.dup2(2, 1)  # whatever llama.cpp or Python prints goes to stderr
    sys.stdout = sys.stderr

    def answer(payload: dict[str, Any]) -> None:
        with os.fdopen(answer_fd, "w") as out:
            out.write(json.dumps(payload) + "\n")

    request = json.loads(sys.stdin.read())
    try:
        import llama_cpp as L
    except ImportError as exc:
        answer({"ok": False, "kind": "missing", "error": f"cannot import llama_cpp ({exc})"})
        return 1
    verbose = os.environ.get("SLOTH_LLAMA_CPP_VERBOSE", "") not in ("", "0")
    log = _install_log(L, verbose)
    L.llama_backend_init()
    try:
        result = OPS[request["op"]](L, request)
    except Exception as exc:  # reported to the parent, which raises LlamaCppError
        answer({"ok": False, "kind": type(exc).__name__, "error": str(exc)})
        return 1
    answer({"ok": True, "result": result})
    del log
    return 0


if __name__ == "__main__":
    sys.exit(main())
