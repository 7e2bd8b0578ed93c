"""The vocabulary in the GGUF file: llama.cpp tokenizes like the Hugging Face tokenizer.

sloth's test tokenizer is byte-level BPE with Qwen2's split (``tokenizer.ggml.pre`` =
``qwen2``); :func:`gguf_helpers.spm_tokenizer` is a Llama 2 style SentencePiece BPE with
byte fallback (``tokenizer.ggml.model`` = ``llama``, with scores).
"""

from __future__ import annotations

import gguf
import pytest
from gguf_helpers import SAMPLES, export, requires_llama_cpp, spm_tokenizer, tiny
from gguf_helpers import tokenizer_texts as _texts
from sloth_gguf.vocab import detect_pre, vocab_from_tokenizer

from sloth_core.sdk import llama_cpp


@requires_llama_cpp
def test_byte_level_bpe_tokenizes_like_transformers(exported, tokenizer):
    path = exported("llama", "f32")
    texts = _texts(tokenizer)
    assert llama_cpp.run_tokenize(path, texts) == [tokenizer(t)["input_ids"] for t in texts]
    plain = llama_cpp.run_tokenize(path, texts, add_special=False, parse_special=False)
    want = [
        tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        for t in texts
    ]
    assert plain == want


@requires_llama_cpp
def test_sentencepiece_bpe_tokenizes_like_transformers(tmp_path):
    tokenizer = spm_tokenizer()
    path = export(tiny("llama", tokenizer=tokenizer), tokenizer, tmp_path / "spm.gguf", "f32")
    texts = _texts(specials=False)
    assert any(
        "<0x" in t for t in tokenizer.convert_ids_to_tokens(tokenizer(SAMPLES[-1])["input_ids"])
    )
    assert llama_cpp.run_tokenize(path, texts) == [tokenizer(t)["input_ids"] for t in texts]
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3  # <unk> is special here, as in Llama 2
    assert types[3:259] == [gguf.TokenType.BYTE] * 256
    # Pieces made by merges score minus the rank of the merge: later pieces score lower.
    scores, vocab = fields["tokenizer.ggml.scores"], tokenizer.get_vocab()
    merged = sorted(i for t, i in vocab.items() if i >= 259 and len(t) > 1)
    assert all(scores[a] > scores[b] for a, b in zip(merged, merged[1:], strict=False))


def test_pre_tokenizer_is_recognised_or_refused(tokenizer):
    import json

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    assert detect_pre(data) == "qwen2"
    llama3 = json.loads(json.dumps(data).replace(r"\\p{N}|", r"\\p{N}{1,3}|"))
    assert detect_pre(llama3) == "llama-bpe"
    gpt2 = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    assert detect_pre(gpt2) == "gpt-2"
    odd = json.loads(json.dumps(data).replace(r"\\p{N}|", r"\\p{N}{1,2}|"))
    with pytest.raises(ValueError, match="tokenizer_pre="):
        detect_pre(odd)


def test_tokenizer_pre_option_overrides_detection(tokenizer):
    vocab = vocab_from_tokenizer(tokenizer, 513, tokenizer_pre="llama-bpe")
    assert vocab.pre == "llama-bpe" and vocab.model == "gpt2"
    with pytest.raises(ValueError, match="ids up to 511"):
        vocab_from_tokenizer(tokenizer, 300)
