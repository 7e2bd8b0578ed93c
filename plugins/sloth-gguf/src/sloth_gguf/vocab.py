"""A Hugging Face tokenizer as GGUF ``tokenizer.ggml.*`` metadata.

Two kinds of tokenizer.json ``BPE`` models are written:

- **byte-level BPE** (GPT-2, Llama 3, Qwen, sloth's test tokenizer): ``tokenizer.ggml.model``
  ``gpt2``, the byte-level token strings, the merges, and ``tokenizer.ggml.pre`` naming the
  pre-tokenizer split that llama.cpp reimplements: found by matching the tokenizer's
  ``Split`` regex against :data:`PRE_TOKENIZERS`.
- **SentencePiece BPE** (``byte_fallback``, ``▁`` for spaces: Llama 2, Mistral, Gemma):
  ``tokenizer.ggml.model`` ``llama`` with scores. llama.cpp merges the adjacent pair
  whose joined piece scores highest, so each piece scores minus the rank of the merge that
  makes it; the ``<0xNN>`` byte pieces are typed ``BYTE``.

The model's vocabulary may be larger than the tokenizer's (padded embeddings); the extra
ids become ``[PAD<id>]`` tokens of type ``UNUSED``, as llama.cpp's converter writes them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import gguf

__all__ = ["PRE_TOKENIZERS", "Vocab", "vocab_from_tokenizer"]

#: ``tokenizer.ggml.pre`` by the split regex of the tokenizer.json ``Split`` pre-tokenizer
#: (the original regexes that llama.cpp's llama-vocab.cpp reimplements).
PRE_TOKENIZERS: dict[str, str] = {
    # Llama 3: numbers in runs of up to three digits.
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",  # noqa: E501
    # Qwen2/2.5/3 (and sloth's test tokenizer): one digit per token.
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",  # noqa: E501
}  # fmt: skip
#: GPT-2's split, which the ``ByteLevel`` pre-tokenizer applies itself with ``use_regex``.
GPT2_PRE = "gpt-2"
#: Token texts llama.cpp treats as end of turn, to name ``tokenizer.ggml.eot_token_id``.
EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    """Everything ``tokenizer.ggml.*`` needs, ready to write."""

    model: str  # "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: Any = None

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"GGUF export needs a fast tokenizer (tokenizer.json); got {type(tokenizer).__name__}"
        )
    return json.loads(backend.to_str())


def _pre_tokenizers(spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [p for child in spec["pretokenizers"] for p in _pre_tokenizers(child)]
    return [spec]


def detect_pre(data: dict[str, Any]) -> str:
    """The ``tokenizer.ggml.pre`` that splits text like this byte-level tokenizer does."""
    steps = _pre_tokenizers(data.get("pre_tokenizer"))
    splits = [s for s in steps if s.get("type") == "Split"]
    levels = [s for s in steps if s.get("type") == "ByteLevel"]
    if not splits and levels and levels[0].get("use_regex", True):
        return GPT2_PRE
    if len(splits) == 1 and splits[0].get("behavior") == "Isolated" and not splits[0].get("invert"):
        pattern = splits[0].get("pattern", {}).get("Regex")
        if pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
    raise ValueError(
        "GGUF export: no llama.cpp pre-tokenizer is known to split text like this tokenizer "
        f"({json.dumps(data.get('pre_tokenizer'))[:300]}); pass the option tokenizer_pre="
        "'<name>' (a tokenizer.ggml.pre value llama.cpp knows) to choose one"
    )


def _merges(model: dict[str, Any]) -> list[str]:
    out = []
    for merge in model.get("merges", []):
        if isinstance(merge, str):
            out.append(merge)
        else:  # [left, right] pairs (tokenizers >= 0.20); spaces as GGUF's U+0120 shift
            out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part)
                                for part in merge))  # fmt: skip
    return out


def _add_space_prefix(data: dict[str, Any]) -> bool:
    normalizers = data.get("normalizer") or {}
    children = normalizers.get("normalizers", [normalizers])
    if any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in children):
        return True
    for step in _pre_tokenizers(data.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get(
                "add_prefix_space", True
            )
    return False


def _spm_scores(vocab: dict[str, int], merges: list[str]) -> dict[str, float]:
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        scores.setdefault(left + right, -float(rank))
    return {token: scores.get(token, 0.0) for token in vocab}


def vocab_from_tokenizer(
    tokenizer: Any, vocab_size: int, *, tokenizer_pre: str | None = None
) -> Vocab:
    """The GGUF vocabulary of ``tokenizer`` for a model with ``vocab_size`` embeddings."""
    data = _backend_json(tokenizer)
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export supports BPE tokenizers, not {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    for token_id, entry in added.items():
        vocab.setdefault(entry["content"], token_id)
    if max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"the tokenizer has ids up to {max(vocab.values())}, the model {vocab_size}"
        )
    spm = bool(model.get("byte_fallback"))
    merges = _merges(model)
    scores_by_token = _spm_scores(vocab, merges) if spm else {}
    by_id = {token_id: token for token, token_id in vocab.items()}
    unk = model.get("unk_token")

    tokens, types, scores = [], [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-1000.0)
            continue
        tokens.append(token)
        if token_id in added:
            kind = (
                gguf.TokenType.CONTROL
                if added[token_id].get("special")
                else gguf.TokenType.USER_DEFINED
            )
        elif token == unk:
            kind = gguf.TokenType.UNKNOWN
        elif spm and _BYTE_PIECE.fullmatch(token):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        types.append(kind)
        scores.append(scores_by_token.get(token, 0.0) if kind == gguf.TokenType.NORMAL else -1000.0)

    out = Vocab(model="llama" if spm else "gpt2", tokens=tokens, types=[int(t) for t in types])
    if spm:
        out.scores = scores
        out.add_space_prefix = _add_space_prefix(data)
    else:
        out.pre = tokenizer_pre or detect_pre(data)
        out.merges = merges
    out.special_ids = _special_ids(tokenizer, vocab)
    out.add_bos, out.add_eos = _adds_bos_eos(tokenizer)
    out.chat_template = getattr(tokenizer, "chat_template", None)
    return out


def _special_ids(tokenizer: Any, vocab: dict[str, int]) -> dict[str, int]:
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int):
            ids[kind] = token_id
    for text in EOT_TOKENS:
        if text in vocab:
            ids["eot"] = vocab[text]
            break
    return ids


def _adds_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    # What the tokenizer does, rather than what its config claims: the post-processor, the
    # add_bos_token flag and subclasses all show in the ids it returns.
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(with_special) > len(plain) and with_special[0] == bos
    add_eos = eos is not None and len(with_special) > len(plain) and with_special[-1] == eos
    return add_bos, add_eos
