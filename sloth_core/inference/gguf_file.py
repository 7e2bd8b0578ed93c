"""What ``sloth chat`` / ``sloth generate`` read from a GGUF file's metadata.

The chat template (``tokenizer.chat_template``), the vocabulary and special ids (for stop
ids and for decoding the reply) and the context length, through the ``gguf`` package's
``GGUFReader`` (it maps the file; the tensors are not read).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sloth_core.errors import PluginMissingError, SlothError

from .stop import end_of_turn_ids

# llama.cpp's token types (gguf.TokenType): control tokens are what HF calls special.
_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6


@dataclass
class GGUFInfo:
    """The metadata of one GGUF file that inference needs."""

    path: Path
    architecture: str = ""
    context_length: int | None = None
    chat_template: str | None = None
    tokenizer_model: str = ""
    tokens: list[str] = field(default_factory=list)
    token_types: list[int] = field(default_factory=list)
    #: ``bos``, ``eos``, ``eot``, ``eom``, ``pad``, ``unk`` -> id, for those the file has.
    special_ids: dict[str, int] = field(default_factory=dict)

    def vocab(self) -> dict[str, int]:
        return {token: index for index, token in enumerate(self.tokens)}

    def special_tokens(self) -> dict[str, str]:
        """``bos_token``, ``eos_token``... as strings, for the chat template."""
        return {
            f"{name}_token": self.tokens[index]
            for name, index in self.special_ids.items()
            if name in ("bos", "eos", "pad", "unk") and 0 <= index < len(self.tokens)
        }

    def stop_ids(self, chat_template: str | None) -> list[int]:
        found = {self.special_ids[k] for k in ("eos", "eot", "eom") if k in self.special_ids}
        found.update(end_of_turn_ids(self.vocab(), chat_template))
        return sorted(found)

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        """The text of ``ids`` by this file's vocabulary (byte-level BPE or SentencePiece)."""
        data = bytearray()
        for index in ids:
            if not 0 <= index < len(self.tokens):
                continue
            kind = self.token_types[index] if index < len(self.token_types) else 1
            if skip_special and kind == _CONTROL:
                continue
            data += self._token_bytes(self.tokens[index], kind)
        text = data.decode("utf-8", errors="replace")
        if self.tokenizer_model == "llama" and text.startswith(" "):
            text = text[1:]  # SentencePiece's dummy prefix
        return text

    def _token_bytes(self, token: str, kind: int) -> bytes:
        if kind in (_CONTROL, _USER_DEFINED):
            return token.encode("utf-8")
        if self.tokenizer_model == "gpt2":
            table = _unicode_to_byte()
            if all(char in table for char in token):
                return bytes(table[char] for char in token)
            return token.encode("utf-8")
        if self.tokenizer_model == "llama":
            if kind == _BYTE and token.startswith("<0x") and token.endswith(">"):
                return bytes([int(token[3:-1], 16)])
            return token.replace("\u2581", " ").encode("utf-8")
        return token.encode("utf-8")


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    # GPT-2's printable stand-ins for the 256 bytes (as in tokenizers' ByteLevel).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


def _value(fields: dict[str, Any], name: str) -> Any:
    found = fields.get(name)
    return None if found is None else found.contents()


def read_gguf(path: str | Path) -> GGUFInfo:
    """Read ``path``'s metadata.

    Raises:
        PluginMissingError: the ``gguf`` package is not installed.
        SlothError: the file is not a readable GGUF file.
    """
    try:
        from gguf import GGUFReader
    except ImportError:
        raise PluginMissingError(
            "reading a GGUF file needs the gguf package: pip install gguf"
        ) from None
    path = Path(path)
    try:
        fields = GGUFReader(str(path)).fields
    except (OSError, ValueError, KeyError) as exc:
        raise SlothError(f"{path} is not a readable GGUF file: {exc}") from None
    architecture = str(_value(fields, "general.architecture") or "")
    context = _value(fields, f"{architecture}.context_length")
    special = {}
    for name in ("bos", "eos", "eot", "eom", "pad", "unk"):
        index = _value(fields, f"tokenizer.ggml.{name}_token_id")
        if index is None and name == "pad":
            index = _value(fields, "tokenizer.ggml.padding_token_id")
        if index is not None:
            special[name] = int(index)
    template = _value(fields, "tokenizer.chat_template")
    return GGUFInfo(
        path=path,
        architecture=architecture,
        context_length=int(context) if context else None,
        chat_template=str(template) if template else None,
        tokenizer_model=str(_value(fields, "tokenizer.ggml.model") or ""),
        tokens=[str(t) for t in _value(fields, "tokenizer.ggml.tokens") or []],
        token_types=[int(t) for t in _value(fields, "tokenizer.ggml.token_type") or []],
        special_ids=special,
    )
